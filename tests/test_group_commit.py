"""Group commit and backlog-only pacing, against a real SQLite file and a real mosquitto.

The committer commits whatever waits in one transaction; the uplink publishes only
rows it reads back from the outbox, so a message whose commit fails never goes out.
``replay_rate`` paces the backlog left by an outage; live rows go at once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, parse_config
from agent.pipeline.events import Episode
from agent.uplink.committer import Committer, Pending
from agent.uplink.outbox import Outbox
from agent.uplink.uplink import Uplink

from .conftest import (
    AgentProcess,
    Cloud,
    agent_config,
    normal_rows,
    publish_all,
    publisher,
    wait_until,
    write_config,
)


def numbered(i: int, kind: str = "alert") -> Pending:
    """A message whose body says which submission it was."""
    return Pending((kind, "pump", f"edge/dev1/{kind}/pump",
                    lambda seq: {"seq": seq, "i": i}))


def stored(ob: Outbox) -> list[tuple[int, int]]:
    """(seq, submission number) of every row, in seq order."""
    return [(r.seq, json.loads(r.payload)["i"]) for r in ob.pending(100_000)]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.db")
    yield ob
    ob.close()


class WriteLock:
    """Another connection holding the database's write lock, as a second writer would."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def test_what_waits_during_a_commit_goes_in_one_transaction(outbox: Outbox) -> None:
    committer = Committer(outbox, lambda: None)
    committer.start()
    try:
        lock = WriteLock(outbox.path)
        committer.submit([numbered(0)])
        # The committer took it and waits for the write lock; meanwhile 99 more arrive.
        assert wait_until(lambda: committer.backlog() == 0, timeout=5)
        for i in range(1, 100):
            committer.submit([numbered(i)])
        assert committer.backlog() == 99
        lock.release()
        assert committer.flush(timeout=10)
        assert stored(outbox) == [(i + 1, i) for i in range(100)]
        assert committer.stats()["groups"] == 2 and committer.stats()["largest_group"] == 99
    finally:
        committer.stop()


@pytest.mark.parametrize("bad", [float("nan"), object()], ids=["nan", "not-json-type"])
def test_a_body_that_cannot_be_stored_costs_only_itself(outbox: Outbox, bad: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    committer = Committer(outbox, lambda: None)  # no thread: commits on this one
    poison = Pending(("alert", "pump", "edge/dev1/alert/pump",
                      lambda seq: {"seq": seq, "score": bad}))
    with caplog.at_level(logging.ERROR):
        committer.submit([numbered(0), poison, numbered(2), numbered(3)])
    assert stored(outbox) == [(1, 0), (2, 2), (3, 3)]  # seqs stay contiguous
    assert committer.errors == 1
    assert "alert on pump not stored" in caplog.text


def test_a_full_queue_blocks_the_producer_and_loses_nothing(outbox: Outbox) -> None:
    committer = Committer(outbox, lambda: None, max_queue=5)
    committer.start()
    try:
        lock = WriteLock(outbox.path)
        committer.submit([numbered(0)])
        assert wait_until(lambda: committer.backlog() == 0, timeout=5)
        committer.submit([numbered(i) for i in range(1, 6)])  # the queue is full now
        producer = threading.Thread(target=committer.submit, args=([numbered(6)],))
        producer.start()
        assert wait_until(lambda: committer.waits == 1, timeout=5)
        assert producer.is_alive() and committer.backlog() == 5
        lock.release()
        producer.join(10)
        assert not producer.is_alive()
        assert committer.flush(timeout=10)
        assert stored(outbox) == [(i + 1, i) for i in range(7)]
    finally:
        committer.stop()


def test_alert_lines_are_rate_limited_and_say_how_many_were_left_out(
        outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    committer = Committer(outbox, lambda: None, monotonic=lambda: now[0])

    def alert(n: int) -> Pending:
        e = Episode("alert", "pump", n, ts=1e9 + n, started=1e9 + n, score=9.0, threshold=3.0,
                    anomaly_score=1.0, model="m", model_version=1, window=16)
        return Pending(numbered(n).message, e)

    with caplog.at_level(logging.INFO, logger="agent.uplink.committer"):
        committer.submit([alert(n) for n in range(1, 31)])
        now[0] += 60.0
        committer.submit([alert(31)])
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.uplink.committer"]
    assert len(lines) == 11  # a burst of 10, then one a refill later
    assert lines[0] == "alert on pump: episode 1, score 9, threshold 3 (seq 1)"
    assert lines[-1] == ("alert on pump: episode 31, score 9, threshold 3 (seq 31) "
                         "[20 similar line(s) suppressed]")
    assert len(outbox) == 31


def test_inserts_stay_fsynced_after_acks_that_skip_their_own(outbox: Outbox) -> None:
    full = 2  # PRAGMA synchronous: FULL
    seq = outbox.put("alert", "pump", "t", lambda s: {"seq": s})
    assert outbox.ack([seq]) == 1
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == full
    seq = outbox.put("alert", "pump", "t", lambda s: {"seq": s})
    db = sqlite3.connect(outbox.path, isolation_level=None)
    db.execute("CREATE TRIGGER boom BEFORE DELETE ON outbox "
               "BEGIN SELECT RAISE(ABORT, 'simulated I/O error'); END")
    with pytest.raises(sqlite3.Error):
        outbox.ack([seq])
    db.close()
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == full


# -- with the uplink and a real broker ---------------------------------------------------


def config(tmp_path: Path, port: int, **upstream: Any) -> AgentConfig:
    raw = agent_config(tmp_path, port)
    raw["upstream"].update(upstream)
    return parse_config(raw)


class Clock:
    """A monotonic clock the test moves: replay tokens accrue only when it says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def delivered(cloud: Cloud) -> list[int]:
    """Seqs of the alerts and summaries the cloud received, in arrival order."""
    return [b["seq"] for t, b in list(cloud.messages) if "/status" not in t]


def settled(ob: Outbox, uplink: Uplink, rows: int) -> Callable[[], bool]:
    return lambda: len(ob) == rows and uplink.stats()["inflight"] == 0


def test_live_alerts_at_1000_per_s_are_not_capped_by_replay_rate(
        tmp_path: Path, broker: Any, outbox: Outbox) -> None:
    # replay_rate 1/s: were live alerts paced, 2,000 would take half an hour.
    cfg = config(tmp_path, broker.port, replay_rate=1, max_inflight=20, status_interval_s=3600)
    cloud = Cloud(broker.port, topic="edge/dev1/alert/#")
    uplink = Uplink(cfg, outbox, dict)
    committer = Committer(outbox, uplink.notify)
    committer.start()
    uplink.start()
    try:
        assert uplink.connected.wait(10)
        for k in range(200):  # 10 alerts every 10 ms: 1,000 alerts/s for 2 s
            committer.submit([numbered(10 * k + j) for j in range(10)])
            time.sleep(0.01)
        assert cloud.wait_for(lambda c: len(c.messages) >= 2000, timeout=60), (
            len(cloud.messages))
        assert [b["seq"] for _, b in cloud.messages] == list(range(1, 2001))
        assert wait_until(lambda: len(outbox) == 0, timeout=10)
    finally:
        uplink.stop(drain_timeout=0)
        committer.stop()
        cloud.close()


def test_backlog_after_an_outage_is_paced_in_seq_order_alerts_first(
        tmp_path: Path, broker: Any, outbox: Outbox) -> None:
    # Committed while no uplink ran: 8 alerts (seq 1, 5, ..., 29) among 22 summaries.
    for seq in range(1, 31):
        kind = "alert" if seq % 4 == 1 else "summary"
        outbox.put(kind, "pump", f"edge/dev1/{kind}/pump", lambda s: {"seq": s})
    alerts = list(range(1, 31, 4))
    summaries = [s for s in range(1, 31) if s % 4 != 1]
    clock = Clock()
    cfg = config(tmp_path, broker.port, replay_rate=5, max_inflight=10, status_interval_s=3600)
    cloud = Cloud(broker.port)
    uplink = Uplink(cfg, outbox, dict, monotonic=clock)
    uplink.start()
    try:
        # Connected: a burst of max_inflight tokens, then nothing while the clock stands.
        first = alerts + summaries[:2]
        assert cloud.wait_for(lambda c: len(delivered(c)) >= 10)
        assert wait_until(settled(outbox, uplink, 20), timeout=10)
        # Live during the replay: an alert goes at once (no older alert waits), a
        # summary waits behind the backlog summaries.
        outbox.put("alert", "pump", "edge/dev1/alert/pump", lambda s: {"seq": s})  # 31
        outbox.put("summary", "pump", "edge/dev1/summary/pump", lambda s: {"seq": s})  # 32
        uplink.notify()
        assert cloud.wait_for(lambda c: len(delivered(c)) >= 11)
        assert wait_until(settled(outbox, uplink, 21), timeout=10)
        assert delivered(cloud) == [*first, 31]
        # One second: replay_rate tokens, five more backlog summaries.
        clock.t += 1.0
        assert cloud.wait_for(lambda c: len(delivered(c)) >= 16)
        assert wait_until(settled(outbox, uplink, 16), timeout=10)
        assert delivered(cloud) == [*first, 31, *summaries[2:7]]
        # Long enough for the rest (the bucket holds max_inflight tokens at most).
        for left in (6, 0):
            clock.t += 100.0
            uplink.notify()
            assert wait_until(settled(outbox, uplink, left), timeout=10), len(outbox)
        assert cloud.wait_for(lambda c: len(delivered(c)) >= 32)
        assert delivered(cloud) == [*first, 31, *summaries[2:], 32]
    finally:
        uplink.stop(drain_timeout=0)
        cloud.close()


def test_a_message_whose_commit_fails_is_never_published(
        tmp_path: Path, broker: Any, outbox: Outbox) -> None:
    cfg = config(tmp_path, broker.port, status_interval_s=0.2)
    cloud = Cloud(broker.port)
    uplink = Uplink(cfg, outbox, lambda: {"outbox": outbox.health()})
    committer = Committer(outbox, uplink.notify)
    committer.start()
    uplink.start()
    # The database refuses every insert, as a failing disk would.
    db = sqlite3.connect(outbox.path, isolation_level=None, timeout=10)
    db.execute("CREATE TRIGGER refuse BEFORE INSERT ON outbox "
               "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    try:
        assert uplink.connected.wait(10)
        committer.submit([numbered(7)])
        assert committer.flush(timeout=10)
        assert outbox.health()["memory_queue"] == 1 and len(outbox) == 0

        def status_after_failure(c: Cloud) -> bool:
            return any(b.get("outbox", {}).get("memory_queue") == 1 for b in c.of("status"))

        # The uplink published a status after the failed commit (QoS 1, one client:
        # in order), and the alert came before none of them.
        assert cloud.wait_for(status_after_failure)
        assert cloud.of("alert") == []
        db.execute("DROP TRIGGER refuse")
        # The outbox writes what it kept once writes work again; then it goes out.
        assert cloud.wait_for(lambda c: [a["i"] for a in c.of("alert")] == [7], timeout=20)
        assert cloud.of("alert")[0]["seq"] == 1
    finally:
        db.close()
        uplink.stop(drain_timeout=0)
        committer.stop()
        cloud.close()


def test_what_is_queued_at_stop_is_committed_and_delivered_before_offline(
        tmp_path: Path, broker: Any, cloud: Cloud, card: Any) -> None:
    # No summary falls due while running: the partial one of the stop is the only one,
    # and it is queued for the committer after the inference thread has stopped.
    proc = AgentProcess(write_config(tmp_path, agent_config(tmp_path, broker.port,
                                                            summary_s=3600)))
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        pub = publisher(broker.port)
        publish_all(pub, "sensors/pump/a", normal_rows(card, 40))
        pub.loop_stop()
        assert cloud.wait_for(lambda c: any(
            s.get("streams", {}).get("pump", {}).get("samples") == 40 for s in c.of("status")))
        assert cloud.of("summary") == []
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert cloud.wait_for(lambda c: c.of("status")[-1]["status"] == "offline")
    kinds = [t.split("/")[2] for t, _ in cloud.messages]
    assert "summary" in kinds and kinds.index("summary") < len(kinds) - 1
    assert [s["count"] for s in cloud.of("summary")] == [40]


def test_live_rows_go_out_from_the_committer_in_seq_order(
        tmp_path: Path, broker: Any, outbox: Outbox) -> None:
    """Once sending runs, the committer hands what it committed to paho itself (no
    wake-up of the sender), in seq order, and only after the commit."""
    cfg = config(tmp_path, broker.port, status_interval_s=3600)
    cloud = Cloud(broker.port, topic="edge/dev1/alert/#")
    uplink = Uplink(cfg, outbox, dict)
    publishers: list[tuple[str, int]] = []
    publish = uplink.client.publish

    def recording(topic: str, payload: Any = None, *a: Any, **kw: Any) -> Any:
        if "/alert/" in topic:  # committed before it is handed over
            seq = json.loads(payload)["seq"]
            assert seq <= outbox.last_seq
            publishers.append((threading.current_thread().name, seq))
        return publish(topic, payload, *a, **kw)

    uplink.client.publish = recording  # type: ignore[method-assign]
    committer = Committer(outbox, uplink.notify)
    committer.start()
    uplink.start()
    try:
        assert uplink.connected.wait(10)
        assert wait_until(uplink._live, timeout=10)
        for i in range(20):
            committer.submit([numbered(i)])
            assert cloud.wait_for(lambda c, i=i: len(c.messages) > i)
        assert [b["i"] for _, b in cloud.messages] == list(range(20))
        assert [seq for _, seq in publishers] == list(range(1, 21))
        assert any(name == "committer" for name, _ in publishers), publishers
    finally:
        uplink.stop(drain_timeout=0)
        committer.stop()
        cloud.close()
