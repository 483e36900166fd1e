"""Regressions found in review: each test failed before its fix."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from agent.config import parse_config
from agent.daemon import Agent
from agent.decode import DecodeError, decode
from agent.fleet.manifest import Refusal, parse_manifest
from agent.pipeline.episode import EpisodeRule
from agent.uplink.outbox import Outbox

from .conftest import REPO, agent_config


def _feed(agent: Agent, values: np.ndarray, t0: float) -> None:
    st = agent.streams[0]
    ts = t0 + np.arange(len(values), dtype=np.float64)
    for a in range(0, len(values), 32):
        agent.push(st, ts[a:a + 32], values[a:a + 32].astype(np.float32))


@pytest.mark.parametrize("detector", ["hst", "gaussian"])
def test_model_none_stream_scores_with_its_restored_detector(tmp_path: Path,
                                                             detector: str) -> None:
    # HalfSpaceTrees scores live in [0, 1]: a margin above 1 would never alert, and a
    # hysteresis below the threshold would rarely clear.
    raw = agent_config(tmp_path, 1883, model="none", fields=["a", "b"],
                       warmup=2 * (16 + 100 * 4),
                       adapt={"hst_window": 50, "detector": detector},
                       alert={"threshold": "auto", "quantile": 0.99, "margin": 1.0,
                              "cooldown_s": 0, "clear_ratio": 1.0, "clear_windows": 1})
    cfg = parse_config(raw, base_dir=REPO)
    rng = np.random.default_rng(0)
    first = Agent(cfg)
    _feed(first, rng.standard_normal((2000, 2)), 1.7e9)
    first.save_state()
    first.outbox.close()

    again = Agent(cfg)
    st = again.streams[0]
    assert st.state != "warming_up", "the restored detector must not warm up again"
    _feed(again, rng.standard_normal((400, 2)), 1.7e9 + 10_000)
    before = st.alerts
    _feed(again, rng.standard_normal((200, 2)) + 8.0, 1.7e9 + 20_000)
    assert st.alerts > before, "a restored model: none stream must still alert"
    again.outbox.close()


def test_reloaded_threshold_survives_the_next_batch(tmp_path: Path, card) -> None:
    raw = agent_config(tmp_path, 1883)
    agent = Agent(parse_config(raw, base_dir=REPO))
    st = agent.streams[0]
    rng = np.random.default_rng(0)
    _feed(agent, card.mean + card.std * 0.3 * rng.standard_normal((400, 8)), 1.7e9)
    assert st.calibrator.adaptive
    stream = {**raw["streams"][0], "alert": {**raw["streams"][0]["alert"], "threshold": 1e6}}
    assert agent.reload(parse_config({**raw, "streams": [stream]}, base_dir=REPO)) == []
    _feed(agent, card.mean + card.std * 0.3 * rng.standard_normal((40, 8)), 1.7e9 + 1000)
    assert st.threshold == pytest.approx(1e6)
    agent.outbox.close()


@pytest.mark.parametrize(("ts", "seconds"), [
    (1_700_000_000, 1_700_000_000.0),            # seconds
    (1_700_000_000_500, 1_700_000_000.5),        # milliseconds
    (1_700_000_000_500_000, 1_700_000_000.5),    # microseconds
    (1_700_000_000_500_000_000, 1_700_000_000.5),  # nanoseconds
])
def test_timestamp_units_by_magnitude(ts: int, seconds: float) -> None:
    got, _ = decode(json.dumps({"ts": ts, "x": 1.0}).encode(), "json", ["x"], 0.0)
    assert got == pytest.approx(seconds)


@pytest.mark.parametrize("ts", [-5, 5e9, "2150-01-01T00:00:00"])
def test_timestamps_outside_1970_2100_are_refused(ts: object) -> None:
    with pytest.raises(DecodeError) as e:
        decode(json.dumps({"ts": ts, "x": 1.0}).encode(), "json", ["x"], 0.0)
    assert e.value.kind == "bad_timestamp"
    with pytest.raises(DecodeError):
        decode(json.dumps({"ts": [1e9, ts], "x": [1.0, 2.0]}).encode(), "json", ["x"], 0.0)


def test_cooldown_restarts_when_the_sensor_clock_goes_back() -> None:
    rule = EpisodeRule(cooldown_s=600)
    one, low = np.array([5.0]), np.array([0.0])
    assert rule.update(one, 1.0, np.array([4e9]))[1]  # a far-future reading opens one
    rule.update(low, 1.0, np.array([4e9 + 1]))  # and it closes
    assert rule.update(one, 1.0, np.array([1.7e9]))[1]  # back to real time: opens again


def test_failed_ack_rolls_back_and_the_outbox_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path)
    seq = ob.put("alert", "s", "t", lambda s: {"seq": s})
    db = sqlite3.connect(path)  # a DELETE that fails mid-transaction, like an I/O error
    db.execute("CREATE TRIGGER boom BEFORE DELETE ON outbox "
               "BEGIN SELECT RAISE(ABORT, 'simulated I/O error'); END")
    db.commit()
    with pytest.raises(sqlite3.Error):
        ob.ack([seq])
    assert not ob._db.in_transaction
    assert ob.put("alert", "s", "t", lambda s: {"seq": s}) == seq + 1
    assert len(ob) == 2
    db.execute("DROP TRIGGER boom")
    db.commit()
    db.close()
    assert ob.ack([seq]) == 1
    ob.close()


@pytest.mark.parametrize("payload", [
    b"[" * 100_000 + b"]" * 100_000,
    json.dumps({"schema": "edge-agent-manifest/1", "name": "m", "version": 10**400}).encode(),
])
def test_malformed_manifests_are_refusals(payload: bytes) -> None:
    with pytest.raises(Refusal):
        parse_manifest(payload)
