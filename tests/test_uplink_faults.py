"""Uplink fault tests: broker kills, agent kills, refused publishes, budget during outages.

Two real mosquittos: a local one for the sensors and a cloud one (with
persistence, saved on every change) that the tests SIGKILL and restart.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import LocalBroker

from .conftest import (
    TESTS,
    AgentProcess,
    agent_config,
    anomalous_rows,
    normal_rows,
    publisher,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

CLOUD_CONF = """
listener {port} 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence true
persistence_location {workdir}/
autosave_interval 1
autosave_on_changes true
"""


class DurableCloud:
    """A cloud subscriber with a persistent session that rides out broker restarts."""

    def __init__(self, port: int, topic: str = "edge/#") -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="durable-cloud",
                                  protocol=mqtt.MQTTv311, clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, json.loads(msg.payload)))
            self._cond.notify_all()

    def seqs(self) -> set[int]:
        with self._cond:
            return {b["seq"] for _, b in self.messages if "seq" in b}

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [b for t, b in self.messages if f"/{kind}" in t]

    def wait_for(self, pred: Any, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def outbox_state(state_dir: Path) -> tuple[list[int], int, dict[str, int]]:
    """(seqs waiting, last seq allocated, evicted by class), read beside the running agent."""
    db = sqlite3.connect(f"file:{state_dir / 'outbox.db'}?mode=ro", uri=True, timeout=5)
    try:
        seqs = [r[0] for r in db.execute("SELECT seq FROM outbox ORDER BY seq")]
        meta = dict(db.execute("SELECT key, value FROM meta"))
    finally:
        db.close()
    evicted = {k[8:]: v for k, v in meta.items() if k.startswith("evicted_")}
    return seqs, int(meta.get("last_seq", 0)), evicted



@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalBroker]:
    b = LocalBroker((TESTS / "mosquitto.conf").read_text(), workdir=tmp_path / "local")
    b.start()
    yield b
    b.close()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LocalBroker]:
    b = LocalBroker(CLOUD_CONF, workdir=tmp_path / "cloud")
    b.start()
    yield b
    b.close()


def fault_config(tmp_path: Path, local: LocalBroker, upstream: LocalBroker,
                 **stream: Any) -> dict[str, Any]:
    cfg = agent_config(tmp_path, local.port, **{"warmup": 32, "summary_s": 0.5, **stream})
    # These tests need a steady flow of alerts, one per anomalous burst: an episode
    # closes on the first normal window (no smoothing, no hysteresis).
    cfg["streams"][0]["alert"].update(smoothing=1.0, clear_windows=1, clear_ratio=1.0)
    cfg["upstream"].update(port=upstream.port, reconnect_min_s=0.2, reconnect_max_s=1.0,
                           replay_rate=500)
    return cfg


class Sensors:
    """Streams normal readings with an anomalous burst every ``every`` samples."""

    def __init__(self, port: int, card: Any, every: int = 60, rate: float = 400.0) -> None:
        self.pub = publisher(port)
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, args=(card, every, rate), daemon=True)
        self._thread.start()

    def _run(self, card: Any, every: int, rate: float) -> None:
        t = 1_800_000_000.0
        while not self._stop.is_set():
            rows = normal_rows(card, every - 8, seed=self.sent, t0=t)
            rows += anomalous_rows(card, 8, t0=t + every - 8)
            for r in rows:
                self.pub.publish("sensors/pump/a", json.dumps(r), qos=0)
                self.sent += 1
                time.sleep(1 / rate)
                if self._stop.is_set():
                    break
            t += every

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pub.loop_stop()
        self.pub.disconnect()


def test_upstream_killed_and_restarted_loses_no_seq(tmp_path, local, upstream, card):
    cloud = DurableCloud(upstream.port)
    cfg = fault_config(tmp_path, local, upstream)
    proc = AgentProcess(write_config(tmp_path, cfg))
    sensors = None
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        sensors = Sensors(local.port, card)
        assert cloud.wait_for(lambda c: len(c.of("alert")) >= 2), proc.output()
        for _ in range(3):
            upstream.stop(kill=True)  # SIGKILL: no clean shutdown, no will from us
            time.sleep(1.5)  # alerts and summaries pile up in the outbox meanwhile
            upstream.start()
            time.sleep(1.5)
        sensors.stop()
        state = Path(cfg["state_dir"])
        assert wait_until(lambda: outbox_state(state)[0] == [], timeout=30), outbox_state(state)
        last = outbox_state(state)[1]
        assert cloud.wait_for(lambda c: c.seqs() >= set(range(1, last + 1)), timeout=30), (
            sorted(set(range(1, last + 1)) - cloud.seqs()))
        assert len(cloud.of("alert")) >= 5 and len(cloud.of("summary")) >= 5
        # In order per topic: first deliveries of each topic come in seq order.
        seen: dict[str, list[int]] = {}
        for topic, body in cloud.messages:
            if "seq" in body and body["seq"] not in seen.setdefault(topic, []):
                seen[topic].append(body["seq"])
        for topic, seqs in seen.items():
            assert seqs == sorted(seqs), topic
        assert proc.terminate() == 0
    finally:
        if sensors:
            sensors.stop()
        if proc.proc.poll() is None:
            proc.kill()
        cloud.close()


def test_agent_sigkill_loses_nothing_committed(tmp_path, local, upstream, card):
    upstream.stop()  # the cloud is away while the agent works
    cfg = fault_config(tmp_path, local, upstream)
    state = Path(cfg["state_dir"])
    path = write_config(tmp_path, cfg)
    proc = AgentProcess(path)
    assert proc.wait_log("subscribed to"), proc.output()
    pub = publisher(local.port)
    for burst in range(3):
        t0 = 1_900_000_000.0 + burst * 100
        for r in normal_rows(card, 40, t0=t0) + anomalous_rows(card, 8, t0=t0 + 40):
            pub.publish("sensors/pump/a", json.dumps(r), qos=1).wait_for_publish(5)
    assert wait_until(lambda: len(outbox_state(state)[0]) >= 3, timeout=30), outbox_state(state)
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)
    committed, last, _ = outbox_state(state)
    assert committed

    upstream.start()
    cloud = DurableCloud(upstream.port)
    proc = AgentProcess(path)
    try:
        assert cloud.wait_for(lambda c: c.seqs() >= set(committed), timeout=30), (
            sorted(set(committed) - cloud.seqs()))
        t0 = 1_900_010_000.0
        for r in normal_rows(card, 40, t0=t0) + anomalous_rows(card, 8, t0=t0 + 40):
            pub.publish("sensors/pump/a", json.dumps(r), qos=1).wait_for_publish(5)
        # The restarted agent warms up again (its state is not checkpointed yet), then
        # alerts with seqs after everything it committed before the kill.
        assert cloud.wait_for(lambda c: any(a["seq"] > last for a in c.of("alert")),
                              timeout=30), proc.output()
        assert proc.terminate() == 0
    finally:
        pub.loop_stop()
        if proc.proc.poll() is None:
            proc.kill()
        cloud.close()


def test_refused_publishes_stay_in_the_outbox_until_allowed(tmp_path, local, card):
    acl = tmp_path / "acl"
    acl.write_text("topic read edge/#\ntopic write edge/dev1/status\n")
    conf = (CLOUD_CONF.replace("persistence true", "persistence false")
            + f"acl_file {acl}\n")
    cloud_broker = LocalBroker(conf, workdir=tmp_path / "acl-cloud").start()
    cloud = DurableCloud(cloud_broker.port)
    cfg = fault_config(tmp_path, local, cloud_broker, summary_s=0)
    state = Path(cfg["state_dir"])
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        pub = publisher(local.port)
        for r in normal_rows(card, 40, t0=2e9) + anomalous_rows(card, 8, t0=2e9 + 40):
            pub.publish("sensors/pump/a", json.dumps(r), qos=1).wait_for_publish(5)
        pub.loop_stop()
        # The broker answers PUBACK "not authorized" (MQTT 5): nothing is deleted.
        assert proc.wait_log("upstream refused seq", timeout=20), proc.output()
        assert cloud.wait_for(lambda c: any(
            s.get("uplink", {}).get("rejected", 0) >= 1 for s in c.of("status")))
        waiting = outbox_state(state)[0]
        assert waiting and cloud.of("alert") == []
        acl.write_text("topic readwrite edge/#\n")
        cloud_broker.proc.send_signal(signal.SIGHUP)  # mosquitto reloads its ACL
        assert cloud.wait_for(lambda c: c.seqs() >= set(waiting), timeout=90), proc.output()
        assert wait_until(lambda: outbox_state(state)[0] == [], timeout=10)
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        cloud.close()
        cloud_broker.close()


def test_budget_during_outage_evicts_summaries_before_alerts(tmp_path, local, upstream, card):
    # The cloud's persistent session exists before the outage, so what the agent
    # delivers the moment the broker is back is queued for it.
    cloud = DurableCloud(upstream.port)
    upstream.stop()
    cfg = fault_config(tmp_path, local, upstream, summary_s=0.2)
    cfg["outbox"] = {"max_rows": 10}
    state = Path(cfg["state_dir"])
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        pub = publisher(local.port)
        for r in normal_rows(card, 40, t0=2e9) + anomalous_rows(card, 4, t0=2e9 + 40):
            pub.publish("sensors/pump/a", json.dumps(r), qos=1).wait_for_publish(5)
        # Keep normal data flowing so summaries keep coming while the cloud is away.
        t0 = 2e9 + 100
        for i in range(600):
            if outbox_state(state)[2].get("summary", 0) >= 5:
                break
            pub.publish("sensors/pump/a", json.dumps(normal_rows(card, 1, t0=t0 + i)[0]))
            time.sleep(0.05)
        pub.loop_stop()
        waiting, _, evicted = outbox_state(state)
        db = sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True)
        committed_alerts = {r[0] for r in db.execute("SELECT seq FROM outbox WHERE kind='alert'")}
        db.close()
        n_alerts = len(committed_alerts)
        assert n_alerts >= 1
        assert evicted.get("summary", 0) >= 5 and evicted.get("alert", 0) == 0, evicted
        assert len(waiting) <= 10
        upstream.start()
        assert cloud.wait_for(lambda c: any(
            s.get("evicted", {}).get("summary", 0) >= 5 for s in c.of("status")))
        status = [s for s in cloud.of("status") if "evicted" in s][-1]
        assert status["evicted"].get("alert", 0) == 0
        # Summaries may still be evicted by newer ones until the link is back;
        # every alert committed during the outage must arrive.
        assert cloud.wait_for(lambda c: len(c.of("alert")) >= n_alerts, timeout=30)
        assert {a["seq"] for a in cloud.of("alert")} >= committed_alerts
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        cloud.close()
