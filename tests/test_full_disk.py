"""The outbox on a real, small tmpfs that fills up: deletes keep working, nothing is re-sent
in a loop, new messages wait in memory, and it recovers by itself when space returns."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.uplink.outbox import Outbox
from agent.uplink.uplink import Uplink

from .conftest import Cloud, agent_config, wait_until

TMPFS_SIZE = 4 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, name: str = "filler") -> Path:
    """A filler file taking every free block of the file system."""
    filler = mnt / name
    st = os.statvfs(mnt)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
        with contextlib.suppress(OSError):  # fallocate may leave a few blocks
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def body(seq: int) -> dict[str, Any]:
    return {"seq": seq, "pad": "x" * 400}


def msg() -> tuple[str, str, str, Any]:
    return ("alert", "s", "edge/dev1/alert/s", body)



def test_full_disk_delivers_deletes_queues_and_recovers_without_restart(
        small_fs: Path, tmp_path: Path, broker: Any) -> None:
    ob = Outbox(small_fs / "outbox.db")
    assert ob.health()["reserve"] and ob.degraded is None
    committed = [s for _ in range(30) for s in ob.submit([msg()])]
    assert committed == list(range(1, 31))
    filler = fill(small_fs)
    # Upstream down while the disk fills: the disk refuses, the memory queue takes them.
    for _ in range(2000):
        committed += ob.submit([msg()])
        if ob.degraded:
            break
    assert ob.degraded, "the disk never refused a write"
    queued_before = ob.health()["memory_queue"]
    assert queued_before >= 1
    cfg = parse_config(agent_config(tmp_path, broker.port))
    cloud = Cloud(broker.port)
    uplink = Uplink(cfg, ob, lambda: {})
    uplink.start()
    try:
        # Upstream is back: every committed row is delivered AND deleted (the reserve
        # makes room for the deletes), and none is sent in a loop.
        assert cloud.wait_for(lambda c: {b["seq"] for b in c.of("alert")} >= set(committed),
                              timeout=30)
        assert wait_until(lambda: len(ob) == 0, timeout=30), ob.health()
        time.sleep(1.0)  # a duplicate storm would show within a second (16,379 in 30 s)
        sends = collections.Counter(b["seq"] for b in cloud.of("alert"))
        assert max(sends.values()) <= 2, sends.most_common(3)
        # Deleting delivered rows and truncating the WAL may give room back by itself;
        # fill what it freed: new messages wait in memory, counted; nothing raises.
        filler2 = fill(small_fs, "filler2")
        for _ in range(2000):
            committed += ob.submit([msg()])
            if ob.degraded:
                break
        for _ in range(5):
            ob.submit([msg()])
        h = ob.health()
        assert h["degraded"] and h["memory_queue"] >= 5 and h["write_errors"] >= 1
        queued = h["memory_queue"]
        # Space returns: recovered with no restart; the queue goes out, seqs contiguous.
        filler.unlink()
        filler2.unlink()
        assert wait_until(lambda: ob.degraded is None, timeout=30), ob.health()
        assert ob.health()["reserve"]
        # Nothing the disk refused was lost: every message submitted got a seq.
        total = len(committed) + queued_before + queued
        assert ob.last_seq == total
        assert cloud.wait_for(lambda c: len({b["seq"] for b in c.of("alert")}) >= total,
                              timeout=30)
        seqs = sorted({b["seq"] for b in cloud.of("alert")})
        assert seqs == list(range(1, total + 1))
        assert wait_until(lambda: len(ob) == 0, timeout=30)
    finally:
        uplink.stop(drain_timeout=1)
        cloud.close()
        ob.close()


def test_full_disk_state_survives_a_restart(small_fs: Path) -> None:
    ob = Outbox(small_fs / "outbox.db")
    accepted = [s for _ in range(20) for s in ob.submit([msg()])]
    filler = fill(small_fs)
    for _ in range(2000):
        accepted += ob.submit([msg()])
        if ob.degraded:
            break
    assert ob.degraded
    ob.ack(accepted[:10])  # a delete on the full disk works (through the reserve)
    ob.close()
    filler.unlink()
    # The old outbox's WAL grew into the freed space and refused every new alert,
    # across restarts; this one opens, takes its reserve back and accepts.
    ob = Outbox(small_fs / "outbox.db")
    try:
        assert ob.degraded is None and ob.health()["reserve"]
        # Committed rows kept (plus what close() could still write from memory).
        waiting = [r.seq for r in ob.pending(10_000)]
        assert waiting[:len(accepted) - 10] == accepted[10:]
        assert waiting == list(range(11, ob.last_seq + 1))
        new = [s for _ in range(200) for s in ob.submit([msg()])]
        assert new == list(range(waiting[-1] + 1, waiting[-1] + 201))
        assert (small_fs / "outbox.db-wal").stat().st_size <= 2 * 1024 * 1024
    finally:
        ob.close()


def _get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_agent_on_a_full_disk_says_degraded_and_recovers(small_fs: Path, tmp_path: Path,
                                                         broker: Any) -> None:
    # The probe's setup: state_dir on a small tmpfs, upstream down, alerts forced.
    from agent.broker import free_port

    from .conftest import AgentProcess, normal_rows, publish_all, publisher, write_config

    health = free_port()
    cfg = agent_config(tmp_path, broker.port, warmup=32)
    cfg["state_dir"] = str(small_fs / "state")
    cfg["upstream"]["port"] = free_port()  # nothing listens: the backlog stays
    cfg["streams"][0]["alert"] = {"threshold": 0.0, "cooldown_s": 0}
    cfg["service"] = {"health": {"port": health}, "ready_timeout_s": 1}
    proc = AgentProcess(write_config(tmp_path, cfg))
    pub = publisher(broker.port)
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        assert wait_until(lambda: _get(health, "/healthz")[0] == 200, timeout=15)
        filler = fill(small_fs)
        from agent.scoring import find_model, load_card

        card = load_card(find_model("skab-ae", Path(__file__).resolve().parent.parent))
        publish_all(pub, "sensors/pump/a", normal_rows(card, 200, t0=1.8e9))

        def degraded() -> bool:
            code, body = _get(health, "/healthz")
            return code == 200 and json.loads(body)["status"] == "degraded"
        assert wait_until(degraded, timeout=30), (_get(health, "/healthz"), proc.output()[-3000:])
        metrics = _get(health, "/metrics")[1]
        assert "edge_agent_outbox_degraded 1.0" in metrics
        assert "edge_agent_outbox_memory_queue" in metrics
        filler.unlink()
        assert wait_until(lambda: json.loads(_get(health, "/healthz")[1])["status"] == "ok",
                          timeout=30), _get(health, "/healthz")
        assert "edge_agent_outbox_degraded 0.0" in _get(health, "/metrics")[1]
        assert "outbox recovered" in proc.output()
        # Rate-limited: not hundreds of lines a second.
        assert proc.output().count("\n") < 400, proc.output()[-3000:]
    finally:
        pub.loop_stop()
        assert proc.terminate() == 0
