"""The ingest fast path against a real mosquitto and a real in-process agent: binary and
MessagePack frames into the ring, topic dispatch, TCP_NODELAY, and batching that loses and
reorders no window."""

from __future__ import annotations

import math
import socket
import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.config import parse_config
from agent.daemon import Agent
from agent.decode import F32_HEADER
from agent.pipeline import Episode, ScoreBatch, StreamPipeline
from agent.scoring.registry import open_stream_model

from .conftest import SKAB_FIELDS, agent_config, publish_all, publisher, wait_until

T0 = 1_700_000_000.0


def _agent(tmp_path: Path, port: int, streams: list[dict[str, Any]] | None = None,
           observer: Any = None, **stream: Any) -> Agent:
    raw = agent_config(tmp_path, port, **stream)
    if streams is not None:
        raw["streams"] = streams
    return Agent(parse_config(raw, base_dir=tmp_path), observer=observer)


def _frame(values: np.ndarray, *, t0: float = T0, period: float = 0.5,
           ts: list[float] | None = None, version: int = 1, flags: int | None = None,
           channels: int | None = None) -> bytes:
    v = np.asarray(values, dtype="<f4")
    flags = (0 if ts is None else 1) if flags is None else flags
    head = F32_HEADER.pack(version, flags, v.shape[1] if channels is None else channels,
                           t0, period)
    return head + (b"" if ts is None else np.asarray(ts, "<f8").tobytes()) + v.tobytes()


def test_f32_frames_reach_the_ring_in_order_and_bad_frames_lose_nothing(tmp_path, broker):
    agent = _agent(tmp_path, broker.port, topic="sensors/pump/bin", format="f32",
                   warmup=100_000)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((10, 8)).astype(np.float32)
    b = rng.standard_normal((5, 8)).astype(np.float32)
    c = rng.standard_normal((7, 8)).astype(np.float32)
    b_ts = [T0 + 20.0, T0 + 20.25, T0 + 21.0, T0 + 30.0, T0 + 30.5]
    good = np.ones((3, 8), np.float32)
    bad = {
        "undecodable": [_frame(good)[:10], _frame(good)[:-3], _frame(good)[:16],
                        _frame(good, version=2), _frame(good, flags=0x04)],
        "wrong_fields": [_frame(np.ones((3, 7)))],
        "bad_timestamp": [_frame(good, period=0.0), _frame(good, period=math.nan),
                          _frame(good, ts=[T0, math.nan, T0])],
        "non_finite": [_frame(np.where(np.eye(3, 8) > 0, np.nan, 1.0)),
                       _frame(np.where(np.eye(3, 8) > 0, np.inf, 1.0))],
    }
    agent.start()
    pub = publisher(broker.port)
    try:
        assert agent.wait_connected(15)
        publish_all(pub, "sensors/pump/bin", [_frame(a, t0=T0, period=0.5)])
        publish_all(pub, "sensors/pump/bin", [f for frames in bad.values() for f in frames])
        publish_all(pub, "sensors/pump/bin", [_frame(b, ts=b_ts), _frame(c, t0=T0 + 40,
                                                                        period=0.125)])
        p = agent.streams[0]
        n_bad = sum(map(len, bad.values()))
        assert wait_until(lambda: p.samples == 22 and sum(
            agent.bad_input.by_kind().values()) == n_bad, timeout=15), \
            (p.samples, agent.bad_input.by_kind())
        ts, values = p.ring.latest(22)
    finally:
        pub.loop_stop()
        agent.stop(drain_timeout=0)
    assert agent.bad_input.by_kind() == {k: len(v) for k, v in bad.items()}
    assert agent.ingest.callback_errors == 0
    expected_ts = [*(T0 + 0.5 * np.arange(10)), *b_ts, *(T0 + 40 + 0.125 * np.arange(7))]
    assert ts.tolist() == expected_ts
    np.testing.assert_array_equal(values, np.concatenate([a, b, c]))


def test_msgpack_readings_and_frames_through_the_broker(tmp_path, broker):
    agent = _agent(tmp_path, broker.port, topic="sensors/pump/mp", format="msgpack",
                   warmup=100_000)
    row = dict(zip(SKAB_FIELDS, map(float, range(8)), strict=True))
    frame = {"ts": [T0 + 1, T0 + 2], **{f: [v, v + 0.5] for f, v in row.items()}}
    enc = msgspec.msgpack.encode
    agent.start()
    pub = publisher(broker.port)
    try:
        assert agent.wait_connected(15)
        publish_all(pub, "sensors/pump/mp", [enc({"ts": T0, **row}), enc({**row, "Current": "x"}),
                                             b"\xc1", enc(frame)])
        p = agent.streams[0]
        assert wait_until(lambda: p.samples == 3 and sum(
            agent.bad_input.by_kind().values()) == 2, timeout=15), agent.bad_input.by_kind()
        ts, values = p.ring.latest(3)
    finally:
        pub.loop_stop()
        agent.stop(drain_timeout=0)
    assert agent.bad_input.by_kind() == {"wrong_fields": 1, "undecodable": 1}
    assert ts.tolist() == [T0, T0 + 1, T0 + 2]
    assert values[:, 0].tolist() == [0.0, 0.0, 0.5] and values[:, 7].tolist() == [7, 7, 7.5]


def test_exact_and_wildcard_topics_reach_their_streams_and_others_are_counted(tmp_path, broker):
    streams = [
        {"name": "pump", "topic": "site/pump/vib", "format": "json", "fields": ["x", "y"],
         "model": "none", "window": 8, "hop": 4, "warmup": 100_000},
        {"name": "temps", "topic": "site/+/temp", "format": "float", "fields": ["t"],
         "model": "none", "window": 8, "hop": 4, "warmup": 100_000},
        {"name": "logs", "topic": "site/logs/#", "format": "csv", "fields": ["v"],
         "model": "none", "window": 8, "hop": 4, "warmup": 100_000},
    ]
    agent = _agent(tmp_path, broker.port, streams=streams)
    agent.start()
    pub = publisher(broker.port)
    try:
        assert agent.wait_connected(15)
        publish_all(pub, "site/pump/vib", [b"[1, 2]"] * 3)
        for topic in ("site/a/temp", "site/b/temp", "site/a/temp"):  # the second a: cached
            publish_all(pub, topic, [b"21.5"])
        publish_all(pub, "site/logs/x/y", [b"1", b"2"])
        # The broker delivers only what the agent subscribed to; a topic no stream owns
        # (a persistent session's old subscription after a config change) is counted.
        agent.ingest._on_message(agent.local, None, _message("site/other", b"1"))
        pump, temps, logs = agent.streams
        assert wait_until(lambda: (pump.samples, temps.samples, logs.samples) == (3, 3, 2),
                          timeout=15), (pump.samples, temps.samples, logs.samples)
    finally:
        pub.loop_stop()
        agent.stop(drain_timeout=0)
    assert agent.bad_input.by_kind() == {"unknown_topic": 1}
    assert agent.ingest.callback_errors == 0


def _message(topic: str, payload: bytes) -> Any:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    return msg


def test_both_mqtt_clients_set_tcp_nodelay(tmp_path, broker):
    agent = _agent(tmp_path, broker.port)
    agent.start()
    try:
        assert agent.wait_connected(15)
        for client in (agent.local, agent.uplink.client):
            sock = client.socket()
            assert isinstance(sock, socket.socket)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        agent.stop(drain_timeout=0)


def _rows(card, n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = card.mean + card.std * 0.3 * rng.standard_normal((n, len(card.mean)))
    x[400:440, 2] += card.std[2] * 25  # one fault: an episode opens and closes
    return x


@pytest.mark.parametrize("max_delay_ms", [0, 200])
def test_batching_loses_and_reorders_no_window(tmp_path, broker, card, max_delay_ms):
    """What the agent scores over MQTT, in batches of whatever is ready, equals a direct
    run of the same readings scored one window at a time."""
    stream = {"batch": 8, "max_delay_ms": max_delay_ms, "warmup": 64, "summary_s": 0,
              "adapt": {"input_halflife": 0, "threshold_halflife": 0},
              "alert": {"threshold": "auto", "quantile": 0.99, "margin": 2.0, "cooldown_s": 0,
                        "clear_windows": 3}}
    seen: list[Any] = []
    lock = threading.Lock()

    def observe(p: StreamPipeline, events: list[Any]) -> None:
        with lock:
            seen.extend(events)

    n = 600
    x = _rows(card, n)
    ts = T0 + np.arange(n, dtype=np.float64)
    rows = [{"ts": float(t), **dict(zip(SKAB_FIELDS, map(float, v), strict=True))}
            for t, v in zip(ts, x, strict=True)]
    agent = _agent(tmp_path, broker.port, observer=observe, **stream)
    agent.start()
    pub = publisher(broker.port)
    windows = (n - 16) // 4 + 1
    try:
        assert agent.wait_connected(15)
        publish_all(pub, "sensors/pump/a", rows)
        assert wait_until(lambda: agent.streams[0].windows_scored == windows, timeout=30), \
            agent.streams[0].windows_scored
    finally:
        pub.loop_stop()
        agent.stop(drain_timeout=0)

    cfg = parse_config(agent_config(tmp_path, broker.port, **{**stream, "batch": 1}),
                       base_dir=tmp_path)
    c, scorer = open_stream_model(cfg, cfg.streams[0])
    direct = StreamPipeline(cfg.streams[0], c, scorer)
    reference: list[Any] = []
    for t, v in zip(ts, x, strict=True):
        reference += direct.push(float(t), v.tolist())

    def scores(events: list[Any]) -> tuple[np.ndarray, ...]:
        batches = [e for e in events if isinstance(e, ScoreBatch)]
        return tuple(np.concatenate([getattr(b, k) for b in batches])
                     for k in ("end_index", "end_ts", "raw", "smoothed"))

    got, want = scores(seen), scores(reference)
    np.testing.assert_array_equal(got[0], np.arange(16, n + 1, 4))  # none lost, none reordered
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    np.testing.assert_allclose(got[3], want[3], rtol=1e-5)

    def episodes(events: list[Any]) -> list[tuple[str, int, float]]:
        return [(e.kind, e.episode, e.ts) for e in events if isinstance(e, Episode)]

    assert episodes(seen) == episodes(reference) and len(episodes(seen)) == 2
    sizes = [len(e.raw) for e in seen if isinstance(e, ScoreBatch) and not e.warm]
    if max_delay_ms:
        assert max(sizes) > 1, sizes  # it did batch: more than one window per model call


def test_wildcard_topics_are_remembered_up_to_a_bound(tmp_path, monkeypatch):
    """A sensor inventing topics under a wildcard cannot grow the dispatch cache."""
    import agent.ingest as ingest

    monkeypatch.setattr(ingest, "RESOLVED_TOPICS_MAX", 50)
    streams = [{"name": "temps", "topic": "site/+/temp", "format": "float", "fields": ["t"],
                "model": "none", "window": 8, "hop": 4, "warmup": 100_000}]
    agent = _agent(tmp_path, 1, streams=streams)
    try:
        for i in range(200):
            agent.ingest._on_message(agent.local, None, _message(f"site/s{i}/temp", b"1.5"))
            agent.ingest._on_message(agent.local, None, _message(f"site/s{i}/other", b"1.5"))
        assert agent.streams[0].samples == 200
        assert agent.bad_input.by_kind() == {"unknown_topic": 200}
        assert len(agent.ingest._resolved) == 50
    finally:
        agent.outbox.close()


def test_paho_hands_each_message_straight_to_the_ingest_dispatch(tmp_path):
    """The ingest client's per-PUBLISH handler skips paho's filter walk: what paho's
    network thread calls reaches the stream, and an unknown topic or a topic that is not
    UTF-8 is counted, as through paho's own dispatch."""
    streams = [{"name": "temps", "topic": "site/+/temp", "format": "float", "fields": ["t"],
                "model": "none", "window": 8, "hop": 4, "warmup": 100_000}]
    agent = _agent(tmp_path, 1, streams=streams)
    try:
        handle = agent.local._handle_on_message
        assert handle == agent.ingest._dispatch
        for i in range(5):
            handle(_message("site/a/temp", f"{i}.5".encode()))
        handle(_message("site/a/other", b"1.5"))
        bad = mqtt.MQTTMessage(topic=b"site/\xff/temp")
        bad.payload = b"1.5"
        handle(bad)
        assert agent.streams[0].samples == 5
        assert agent.bad_input.by_kind() == {"unknown_topic": 1}
        assert agent.ingest.callback_errors == 1
    finally:
        agent.outbox.close()


def test_a_window_that_comes_alone_is_scored_at_once_and_a_close_one_waits(tmp_path, card):
    """Windows that come max_delay_ms or more after the last ones have no batch partner
    coming in time: ingest scores them itself; a window right behind them is left for
    the inference thread to batch (none runs here, so it stays unscored)."""
    agent = _agent(tmp_path, 1, batch=8, max_delay_ms=10_000, warmup=100_000, summary_s=0)
    p = agent.streams[0]
    rows = [{"ts": T0 + i, **dict(zip(SKAB_FIELDS, map(float, v), strict=True))}
            for i, v in enumerate(card.mean + card.std * np.zeros((20, len(card.mean))))]
    payloads = [msgspec.json.encode(r) for r in rows]
    try:
        for body in payloads[:16]:  # the stream's first window: nothing came before it
            agent.ingest._on_message(agent.local, None, _message("sensors/pump/a", body))
        assert p.seen == 16 and p.ring.ready() == 0 and "pump" not in agent.ingest._due
        for body in payloads[16:20]:  # the next one, microseconds later: it waits
            agent.ingest._on_message(agent.local, None, _message("sensors/pump/a", body))
        assert p.seen == 16 and p.ring.ready() == 1 and "pump" in agent.ingest._due
    finally:
        agent.outbox.close()
