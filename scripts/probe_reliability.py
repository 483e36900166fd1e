#!/usr/bin/env python3
"""Print the reliability figures in docs/reliability.md, measured on this machine.

    .venv/bin/python scripts/probe_reliability.py                 # all three
    .venv/bin/python scripts/probe_reliability.py oversize        # peak RSS under an oversize flood
    .venv/bin/python scripts/probe_reliability.py backoff --seconds 60
    .venv/bin/python scripts/probe_reliability.py disk            # needs root (mounts a tmpfs)

Real parts only: a real mosquitto, a real `edge-agent run` process, a real tmpfs.
The slow tests (tests/test_hardening_slow.py) call the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.broker import LocalBroker  # noqa: E402

FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS"]
REFUSING_CONF = ("listener {port} 127.0.0.1\nallow_anonymous false\n"
                 "log_type notice\nlog_type information\nlog_dest file {workdir}/conn.log\n")


def _wait(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def _vm(pid: int, key: str) -> int:
    """VmHWM / VmRSS of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _frame(nbytes: int) -> bytes:
    """A valid JSON frame of about ``nbytes`` (what the old agent decoded into ~10x RSS)."""
    per_sample = 9 * 12
    n = max(1, nbytes // per_sample)
    body = {"ts": [1.7e9 + i for i in range(n)], **{f: [1.25] * n for f in FIELDS}}
    return json.dumps(body).encode()


def oversize_flood(workdir: Path, *, sizes_mb: tuple[int, ...] = (33, 10, 2),
                   per_size: int = 5) -> dict[str, Any]:
    """Peak RSS of `edge-agent run` before and after a flood of oversize frames."""
    broker = LocalBroker(workdir=workdir / "broker").start()
    cfg = {
        "device_id": "probe", "state_dir": str(workdir / "state"),
        "local": {"host": "127.0.0.1", "port": broker.port},
        "upstream": {"host": "127.0.0.1", "port": broker.port, "status_interval_s": 1},
        "streams": [{"name": "pump", "topic": "sensors/pump", "fields": FIELDS,
                     "warmup": 64, "summary_s": 0}],
    }
    conf = workdir / "agent.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    log = (workdir / "agent.log").open("wb")
    exe = Path(sys.executable).parent / "edge-agent"
    proc = subprocess.Popen([str(exe), "run", "--config", str(conf)], stdout=log,
                            stderr=subprocess.STDOUT)
    statuses: list[dict[str, Any]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe-status")
    sub.on_message = lambda c, u, m: statuses.append(json.loads(m.payload))
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("edge/probe/status", qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe-sensor")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        if not _wait(lambda: "subscribed to" in (workdir / "agent.log").read_text(), 60):
            raise RuntimeError((workdir / "agent.log").read_text()[-2000:])
        time.sleep(1.0)
        before = _vm(proc.pid, "VmHWM")
        sent = 0
        for mb in sizes_mb:
            frame = _frame(mb * 1024 * 1024)
            for _ in range(per_size):
                pub.publish("sensors/pump", frame, qos=1).wait_for_publish(60)
                sent += 1
            del frame

        def counted() -> bool:
            return any(s.get("bad_input", {}).get("oversize", 0) >= sent for s in statuses)
        if not _wait(counted, 120):
            raise RuntimeError(f"oversize not counted: {statuses[-1:] or 'no status'}")
        # Still scoring: a normal reading goes in after the flood.
        after = _vm(proc.pid, "VmHWM")
        return {"messages": sent, "sizes_mb": list(sizes_mb), "peak_rss_before_mb":
                round(before / 2**20, 1), "peak_rss_after_mb": round(after / 2**20, 1),
                "alive": proc.poll() is None}
    finally:
        pub.loop_stop()
        sub.loop_stop()
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
        log.close()
        broker.close()


def refusing_broker_attempts(workdir: Path, seconds: float = 60.0, *, min_s: float = 1.0,
                             max_s: float = 8.0) -> dict[str, Any]:
    """Connection attempts the uplink makes against a broker that refuses it (not authorised)."""
    from agent.config import parse_config  # noqa: PLC0415
    from agent.uplink.outbox import Outbox  # noqa: PLC0415
    from agent.uplink.uplink import Uplink  # noqa: PLC0415

    broker = LocalBroker(REFUSING_CONF, workdir=workdir / "refusing").start()
    raw = {"device_id": "probe", "state_dir": str(workdir / "state"),
           "upstream": {"host": "127.0.0.1", "port": broker.port, "reconnect_min_s": min_s,
                        "reconnect_max_s": max_s},
           "streams": [{"name": "s", "topic": "x", "fields": ["a"], "model": "none",
                        "warmup": 1000}]}
    up = Uplink(parse_config(raw, base_dir=workdir), Outbox(workdir / "o.db"), lambda: {})
    start = time.monotonic()
    up.start()
    try:
        time.sleep(seconds)
    finally:
        up.stop(drain_timeout=0)
        up.outbox.close()
    took = time.monotonic() - start
    refused = (broker.workdir / "conn.log").read_text(errors="replace").count("not authorised")
    broker.close()
    return {"seconds": round(took, 1), "attempts": refused,
            "attempts_per_minute": round(refused * 60.0 / took, 1),
            "reconnect_min_s": min_s, "reconnect_max_s": max_s}


def full_disk_recovery(workdir: Path, *, size_mb: int = 4) -> dict[str, Any]:
    """Seconds from freeing the disk to the outbox being healthy (upstream down meanwhile),
    then whether the queued messages reach the cloud with contiguous seqs."""
    from agent.config import parse_config  # noqa: PLC0415
    from agent.uplink.outbox import Outbox  # noqa: PLC0415
    from agent.uplink.uplink import Uplink  # noqa: PLC0415

    mnt = workdir / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                   check=True, capture_output=True)
    broker = LocalBroker(workdir=workdir / "cloud")  # started only after the recovery
    got: set[int] = set()
    ob = Outbox(mnt / "outbox.db")
    raw = {"device_id": "probe", "state_dir": str(mnt),
           "upstream": {"host": "127.0.0.1", "port": broker.port, "reconnect_min_s": 0.2,
                        "reconnect_max_s": 0.5},
           "streams": [{"name": "s", "topic": "x", "fields": ["a"], "model": "none",
                        "warmup": 1000}]}
    cfg = parse_config(raw, base_dir=workdir)
    up = Uplink(cfg, ob, lambda: {})
    msg = ("alert", "s", "edge/probe/alert/s", lambda seq: {"seq": seq, "pad": "x" * 400})
    filler = mnt / "filler"
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe-cloud")
    sub.on_message = lambda c, u, m: got.add(json.loads(m.payload)["seq"])
    try:
        for _ in range(50):
            ob.submit([msg])
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        while not ob.degraded:
            ob.submit([msg])
        for _ in range(20):
            ob.submit([msg])
        up.start()  # upstream down: only its maintenance runs
        time.sleep(2.0)
        still = ob.degraded is not None
        queued = ob.health()["memory_queue"]
        t0 = time.monotonic()
        filler.unlink()
        _wait(lambda: ob.degraded is None, 60, 0.01)
        healthy = time.monotonic() - t0
        # The cloud's subscriber must be in place before the uplink can reach the
        # broker (it retries every 0.2-0.5 s), or the first rows go to nobody: the
        # uplink is stopped and a fresh one, over the same outbox, starts after it.
        up.stop(drain_timeout=0)
        broker.start()
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe("edge/probe/alert/#", qos=1)
        sub.loop_start()
        _wait(subscribed.is_set, 30, 0.01)
        up = Uplink(cfg, ob, lambda: {})
        up.start()
        _wait(lambda: len(got) >= ob.last_seq, 60, 0.01)
        return {"tmpfs_mb": size_mb, "degraded_until_freed": still,
                "queued_in_memory": queued, "healthy_after_s": round(healthy, 2),
                "seqs_delivered": len(got), "last_seq": ob.last_seq,
                "contiguous": sorted(got) == list(range(1, ob.last_seq + 1))}
    finally:
        up.stop(drain_timeout=0)
        ob.close()
        sub.loop_stop()
        broker.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("which", nargs="*", default=["oversize", "backoff", "disk"],
                    choices=["oversize", "backoff", "disk"])
    ap.add_argument("--seconds", type=float, default=60.0, help="backoff: how long to count")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-probe-") as tmp:
        for w in args.which:
            d = Path(tmp) / w
            d.mkdir()
            if w == "oversize":
                r = oversize_flood(d)
            elif w == "backoff":
                r = refusing_broker_attempts(d, args.seconds)
            else:
                r = full_disk_recovery(d)
            print(f"{w}: {json.dumps(r)}", flush=True)


if __name__ == "__main__":
    main()
