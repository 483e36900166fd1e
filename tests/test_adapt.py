"""Adaptation inside the real Agent pipeline (real model, real SQLite), no broker.

Samples go in through ``Agent.push``: the stream pipeline and the outbox sink
that live MQTT messages go through.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent import state
from agent.config import parse_config
from agent.daemon import Agent
from agent.pipeline import StreamPipeline
from agent.pipeline.calibrate import Calibrator

from .conftest import REPO, SKAB_FIELDS, agent_config, write_config


def make_agent(tmp_path: Path, **stream: Any) -> Agent:
    raw = agent_config(tmp_path, 1883, **stream)
    return Agent(parse_config(raw, base_dir=REPO))


def feed(agent: Agent, values: np.ndarray, t0: float) -> None:
    st = agent.streams[0]
    ts = t0 + np.arange(len(values), dtype=np.float64)
    for a in range(0, len(values), 32):
        agent.push(st, ts[a:a + 32], values[a:a + 32].astype(np.float32))


def normal(card, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return card.mean + card.std * 0.3 * rng.standard_normal((n, len(card.mean)))


def anomaly(card, n: int) -> np.ndarray:
    return np.tile(card.mean + card.std * 25.0, (n, 1))


def feedback_msg(st: StreamPipeline, body: Any) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=f"edge/dev1/feedback/{st.cfg.name}".encode())
    msg.payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return msg


def outbox_rows(agent: Agent, kind: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(agent.outbox.path)
    try:
        return [json.loads(p) for (p,) in db.execute(
            "SELECT payload FROM outbox WHERE kind = ? ORDER BY seq", (kind,))]
    finally:
        db.close()


def test_threshold_follows_the_normal_score_level_but_not_anomalies():
    rng = np.random.default_rng(0)
    cal = Calibrator(threshold=None, quantile=0.999, margin=1.5, halflife=50)
    cal.learn_warm(rng.lognormal(0.0, 0.2, 200))
    cal.finish_warmup()
    thr = cal.threshold
    assert thr is not None and thr > 1.0
    cal.adapt(np.array([1.0]))
    assert cal.threshold == pytest.approx(thr, rel=0.05)
    # Windows the episode rule does not call normal are never folded in: anomalies
    # cannot drag the threshold up.
    # A slow doubling of normal scores moves it along.
    for v in rng.lognormal(np.log(2.0), 0.2, 1000):
        cal.adapt(np.array([v]))
    assert cal.threshold == pytest.approx(2 * thr, rel=0.15)
    scores = cal.calibrate(np.array([0.5, 2 * thr, 100.0]))
    assert scores[0] < 0.5 and scores[1] == pytest.approx(0.5, abs=0.05) and scores[2] > 0.99


def test_anomalous_windows_do_not_move_the_threshold(tmp_path, card):
    agent = make_agent(tmp_path, adapt={"drift": "none", "threshold_halflife": 50})
    st = agent.streams[0]
    feed(agent, normal(card, 300), t0=1e9)
    thr = st.threshold
    feed(agent, anomaly(card, 400), t0=1e9 + 300)
    assert st.state == "anomaly"
    assert st.threshold == pytest.approx(thr)


def test_no_alert_in_warm_up_then_anomaly_alerts_with_an_anomaly_score(tmp_path, card):
    agent = make_agent(tmp_path, adapt={"drift": "none"})
    feed(agent, anomaly(card, 60), t0=1e9)  # inside warm-up (64): calibrates only
    assert outbox_rows(agent, "alert") == []
    agent = make_agent(tmp_path / "b", adapt={"drift": "none"})
    feed(agent, normal(card, 300), t0=1e9)
    assert outbox_rows(agent, "alert") == []
    feed(agent, anomaly(card, 24), t0=1e9 + 300)
    alerts = outbox_rows(agent, "alert")
    assert alerts and all(0.5 < a["anomaly_score"] <= 1.0 for a in alerts)
    assert all(a["score"] > a["threshold"] for a in alerts)


def test_confirmed_false_alarm_lowers_similar_scores(tmp_path, card):
    agent = make_agent(tmp_path, adapt={"drift": "none"})
    st = agent.streams[0]
    fault = card.mean + card.std * np.array([8, 8, 0, 0, 0, 0, 0, 0])
    feed(agent, normal(card, 300), t0=1e9)
    feed(agent, np.tile(fault, (24, 1)), t0=1e9 + 300)
    first = outbox_rows(agent, "alert")
    assert first, "the fault did not alert"
    before = st.last_score
    cb = agent._feedback_callback(st)
    # The label names the window ending at ts: here the steady fault, not the onset.
    cb(feedback_msg(st, {"ts": 1e9 + 323, "label": "normal"}))
    assert st.feedback.labels["normal"] == 1
    feed(agent, normal(card, 100, seed=1), t0=1e9 + 324)
    feed(agent, np.tile(fault, (24, 1)), t0=1e9 + 424)
    assert st.last_score < 0.05 * before
    assert st.last_score <= st.threshold
    # Only the onset windows (part normal, part fault: not like the labelled one) alert again.
    again = outbox_rows(agent, "alert")[len(first):]
    assert all(a["ts"] < 1e9 + 424 + 16 for a in again), again
    # A window far from the labelled one is not affected.
    assert st.feedback.adjust(np.ones(1), np.zeros((1, 16)), 0.1)[0] > 0.99


def test_confirmed_anomaly_raises_similar_scores(tmp_path, card):
    agent = make_agent(tmp_path, adapt={"drift": "none"})
    st = agent.streams[0]
    feed(agent, normal(card, 300), t0=1e9)
    cb = agent._feedback_callback(st)
    cb(feedback_msg(st, {"ts": 1e9 + 299, "label": "anomaly"}))
    level = st.calibrator.level()
    summaries = np.zeros((1, 16))
    assert st.feedback.labels["anomaly"] == 1
    proto = st.feedback.prototypes[0][0]
    assert st.feedback.adjust(np.ones(1), proto[None, :], level)[0] == pytest.approx(2.0)
    assert st.feedback.adjust(np.ones(1), summaries + 10, level)[0] == pytest.approx(1.0)


def test_feedback_refusals_are_counted_and_change_nothing(tmp_path, card):
    agent = make_agent(tmp_path, adapt={"drift": "none"})
    st = agent.streams[0]
    feed(agent, normal(card, 200), t0=1e9)
    cb = agent._feedback_callback(st)
    for body in [b"{not json", b"\x80\x04pickle", [1, 2], {"ts": 1e9 + 150, "label": "maybe"},
                 {"label": "normal"}, {"ts": "yesterday", "label": "normal"},
                 {"ts": 5.0, "label": "normal"}]:
        cb(feedback_msg(st, body))
    counts = agent.bad_input.by_kind()
    assert counts == {"feedback": 6, "feedback_unknown_window": 1}
    assert not st.feedback.prototypes


def test_drift_in_inputs_is_an_event_not_an_alert(tmp_path, card):
    agent = make_agent(tmp_path, adapt={"drift": "adwin", "drift_cooldown_s": 0},
                       alert={"threshold": 1e9})
    feed(agent, normal(card, 600), t0=1e9)
    shifted = normal(card, 600, seed=2) + card.std * np.array([0, 0, 0, 0, 0, 0, 0, 1.5])
    feed(agent, shifted, t0=1e9 + 600)
    events = outbox_rows(agent, "event")
    assert outbox_rows(agent, "alert") == []
    assert events, "a sustained input shift raised no drift event"
    fields = {d["field"] for e in events for d in e["drifts"]}
    assert "Volume Flow RateRMS" in fields
    assert events[0]["event"] == "drift" and events[0]["device"] == "dev1"
    assert agent.streams[0].drift.detections >= len(events)


def test_checkpoint_restores_and_skips_warm_up(tmp_path, card):
    a = make_agent(tmp_path, adapt={"drift": "none"}, warmup=400)
    feed(a, normal(card, 500), t0=1e9)
    thr = a.streams[0].threshold
    assert thr is not None
    a.save_state()
    a.outbox.close()
    path = state.checkpoint_path(Path(a.state_dir), "pump")
    assert path.is_file()
    b = make_agent(tmp_path, adapt={"drift": "none"}, warmup=400)
    st = b.streams[0]
    assert st.threshold == pytest.approx(thr)
    feed(b, anomaly(card, 24), t0=2e9)  # 24 samples after restart: far inside a fresh warm-up
    assert outbox_rows(b, "alert"), "a restored stream repeated its warm-up"


def test_checkpoint_from_an_older_schema_is_set_aside(tmp_path, card, caplog):
    a = make_agent(tmp_path, adapt={"drift": "none"})
    feed(a, normal(card, 200), t0=1e9)
    a.save_state()
    a.outbox.close()
    path = state.checkpoint_path(Path(a.state_dir), "pump")
    # What edge-agent 0.1 wrote: a header with format 1, then a pickle.
    header = {"format": 1, "river": "0.21.0", "agent": "0.1.0", "fingerprint": {}}
    path.write_bytes(json.dumps(header).encode() + b"\n" + b"\x80\x05pickle")
    with caplog.at_level(logging.WARNING):
        b = make_agent(tmp_path, adapt={"drift": "none"})
    assert "schema 1" in caplog.text and "recalibrating from warm-up" in caplog.text
    assert b.streams[0].state == "warming_up"
    assert b.streams[0].threshold is None
    assert not path.exists() and path.with_suffix(".state.rejected").exists()


def test_checkpoint_of_a_changed_stream_is_not_restored(tmp_path, card, caplog):
    a = make_agent(tmp_path, adapt={"drift": "none"})
    feed(a, normal(card, 200), t0=1e9)
    a.save_state()
    a.outbox.close()
    with caplog.at_level(logging.WARNING):
        b = make_agent(tmp_path, adapt={"drift": "none"}, warmup=100)
    assert "changed" in caplog.text
    assert b.streams[0].threshold is None


def test_state_reset_command(tmp_path, card):
    raw = agent_config(tmp_path, 1883, adapt={"drift": "none"})
    cfg_path = write_config(tmp_path, raw)
    a = Agent(parse_config(raw, base_dir=REPO))
    feed(a, normal(card, 100), t0=1e9)
    a.save_state()
    a.outbox.close()
    exe = [str(Path(sys.executable).parent / "edge-agent"), "state", "reset"]
    r = subprocess.run([*exe, "--config", str(cfg_path), "--stream", "pump"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "removed" in r.stdout
    assert not state.checkpoint_path(Path(a.state_dir), "pump").exists()
    r = subprocess.run([*exe, "--config", str(cfg_path), "--stream", "pump"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "no saved state" in r.stdout
    r = subprocess.run([*exe, "--config", str(cfg_path), "--stream", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no stream 'nope'" in r.stderr


def test_model_none_stream_detects_a_spike_with_river_alone(tmp_path):
    raw = agent_config(tmp_path, 1883, fields=["value"], format="float", model="none",
                       window=8, hop=1, warmup=600,
                       adapt={"drift": "none", "hst_window": 100, "detector": "hst"},
                       alert={"threshold": "auto", "cooldown_s": 0})
    agent = Agent(parse_config(raw, base_dir=REPO))
    st = agent.streams[0]
    assert st.card.name == "river-hst"
    rng = np.random.default_rng(0)
    t = np.arange(1500)
    x = 10 + np.sin(t / 20) + 0.05 * rng.standard_normal(t.size)
    feed(agent, x[:1200, None], t0=1e9)
    quiet = len(outbox_rows(agent, "alert"))
    x[1300:1304] += 8
    feed(agent, x[1200:, None], t0=1e9 + 1200)
    alerts = outbox_rows(agent, "alert")
    assert len(alerts) > quiet
    assert any(1e9 + 1300 <= a["ts"] <= 1e9 + 1310 for a in alerts), alerts
    assert quiet <= 3, f"{quiet} alerts on a clean sine"


def test_model_stream_without_drift_does_not_import_river(tmp_path):
    raw = agent_config(tmp_path, 1883, adapt={"drift": "none"})
    code = (
        "import sys, yaml, numpy as np\n"
        "from agent.daemon import Agent\n"
        "from agent.config import parse_config\n"
        f"a = Agent(parse_config(yaml.safe_load({yaml_dump(raw)!r}), base_dir={str(REPO)!r}))\n"
        "st = a.streams[0]\n"
        "v = np.tile(st.card.mean, (200, 1)).astype(np.float32)\n"
        "a.push(st, np.arange(200.0), v)\n"
        "assert st.windows_scored > 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('river')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def yaml_dump(raw: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(raw)


def test_config_refuses_model_none_with_model_normalisation_or_short_warm_up(tmp_path):
    from agent.config import ConfigError

    raw = agent_config(tmp_path, 1883, fields=["value"], model="none", normalise="model",
                       warmup=10)
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    text = "\n".join(e.value.problems)
    assert "streams[0].normalise: model needs a model" in text
    assert "streams[0].warmup: model: none learns" in text
    raw["streams"][0].update(normalise="warmup", adapt={"detector": "hst"})
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert any("adapt.hst_window" in p for p in e.value.problems)


def test_skab_fields_constant_matches_the_card(card):
    assert tuple(SKAB_FIELDS) == card.fields


def test_model_none_gaussian_detects_a_spike_without_river(tmp_path):
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(REPO)!r})
from tests.test_adapt import feed, outbox_rows
from tests.conftest import agent_config, REPO
from agent.daemon import Agent
from agent.config import parse_config
from pathlib import Path
raw = agent_config(Path({str(tmp_path)!r}), 1883, fields=["value"], format="float",
                   model="none", window=8, hop=1, warmup=600,
                   alert={{"threshold": "auto", "cooldown_s": 0}})
agent = Agent(parse_config(raw, base_dir=REPO))
assert agent.streams[0].card.name == "windowed-gaussian"
rng = np.random.default_rng(0)
t = np.arange(1500)
x = 10 + np.sin(t / 20) + 0.05 * rng.standard_normal(t.size)
feed(agent, x[:1200, None], t0=1e9)
quiet = len(outbox_rows(agent, "alert"))
x[1300:1304] += 8
feed(agent, x[1200:, None], t0=1e9 + 1200)
alerts = outbox_rows(agent, "alert")
assert any(1e9 + 1300 <= a["ts"] <= 1e9 + 1310 for a in alerts), alerts
assert quiet <= 3, quiet
assert not any(m == "river" or m.startswith("river.") for m in sys.modules), "river imported"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
