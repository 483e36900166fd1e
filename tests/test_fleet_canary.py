"""Canary and watch on live windows: real misbehaving .tflite models (made by
scripts/make_fleet_models.py), a real broker, a real in-process Agent."""

from __future__ import annotations

import math

import pytest

from .conftest import Cloud, anomalous_rows, normal_rows, publish_all, publisher
from .fleet_support import FLEET_DATA, key, push, release, start_agent, watcher  # noqa: F401


def _feed(port, card, rows):
    pub = publisher(port)
    publish_all(pub, "sensors/pump/a", rows)
    pub.loop_stop()


def test_alert_storm_model_fails_its_canary(tmp_path, key, broker, watcher, start_agent, card):
    agent = start_agent(pub=key[1], canary_windows=40)
    rel = release(tmp_path, key[0], 2, (FLEET_DATA / "loud-ae.tflite").read_bytes())
    push(rel, broker.port)
    watcher.state("canary", 2)
    _feed(broker.port, card, normal_rows(card, 300))
    s = watcher.state("rejected", 2, code="canary_failed")
    # Its output is the same whatever the input: calibrated on its own scores it would
    # not alert, so it is refused for tracking nothing the live model sees.
    assert "do not follow the live model" in s["reason"], s
    st = agent.streams[0]
    assert st.card.version == 1 and st.slot.shadow is None
    assert agent.fleet.store.versions("skab-ae") == []
    sha = rel.joinpath("manifest.json").read_text()
    assert any(k in sha for k in agent.fleet.store.rejected("skab-ae"))
    # The same retained manifest, re-delivered, is not tried again.
    push(rel, broker.port)
    agent.fleet.step()
    assert agent.fleet.rollout is None and agent.fleet.receiver.transfer is None


def test_nan_model_fails_its_canary(tmp_path, key, broker, watcher, start_agent, card):
    agent = start_agent(pub=key[1], canary_windows=40)
    push(release(tmp_path, key[0], 2, (FLEET_DATA / "nan-ae.tflite").read_bytes()), broker.port)
    watcher.state("canary", 2)
    _feed(broker.port, card, normal_rows(card, 200))
    s = watcher.state("rejected", 2, code="canary_failed")
    assert "NaN or infinite" in s["reason"]
    assert agent.streams[0].card.version == 1


def test_slow_model_fails_the_latency_budget(tmp_path, key, broker, watcher, start_agent, card):
    # A budget no model call can meet stands in for a model too slow for the device.
    start_agent(pub=key[1], canary_windows=16, latency_budget_ms=1e-6)
    push(release(tmp_path, key[0], 2), broker.port)
    watcher.state("canary", 2)
    _feed(broker.port, card, normal_rows(card, 200))
    s = watcher.state("rejected", 2, code="canary_failed")
    assert "over the budget" in s["reason"]


def test_model_failing_its_watch_is_rolled_back(tmp_path, key, broker, watcher, start_agent,
                                                card):
    cloud = Cloud(broker.port, "edge/dev1/alert/#")
    # The fragile model is the identity on normal data: every score 0, nothing to rank,
    # so the agreement check is switched off to let it reach its watch.
    agent = start_agent(pub=key[1], canary_windows=16, watch_windows=400, min_agreement=-1.0)
    push(release(tmp_path, key[0], 2, (FLEET_DATA / "fragile-ae.tflite").read_bytes()),
         broker.port)
    watcher.state("canary", 2)
    rows = normal_rows(card, 200)
    _feed(broker.port, card, rows)
    watcher.state("active", 2)  # passed the canary on normal data, now watched
    assert agent.streams[0].card.version == 2
    # A real anomaly: the fragile model's scores overflow to inf.
    _feed(broker.port, card, anomalous_rows(card, 40, t0=rows[-1]["ts"] + 1))
    s = watcher.state("rolled_back", 2, code="watch_failed")
    assert "NaN or infinite" in s["reason"] and s["active"] == {"skab-ae": 1}
    st = agent.streams[0]
    assert st.card.version == 1 and st.slot.shadow is None
    assert agent.fleet.store.active("skab-ae") is None  # back to the configured model
    # The anomaly was still reported, by the old model, with finite scores.
    assert cloud.wait_for(lambda c: len(c.messages) >= 1)
    alerts = [b for _, b in cloud.messages if b["event"] == "alert"]
    assert alerts
    assert all(math.isfinite(a["score"]) and a["model_version"] == 1 for a in alerts), alerts
    assert st.ring.windows_dropped == 0
    cloud.close()


def test_real_anomaly_during_watch_does_not_roll_back_a_good_model(tmp_path, key, broker,
                                                                   watcher, start_agent, card):
    agent = start_agent(pub=key[1], canary_windows=16, watch_windows=60)
    push(release(tmp_path, key[0], 2), broker.port)
    watcher.state("canary", 2)
    rows = normal_rows(card, 300)
    _feed(broker.port, card, rows)
    watcher.state("active", 2)
    # Both models alert on the anomaly, so the new one is not blamed for it.
    t = rows[-1]["ts"] + 1
    _feed(broker.port, card, anomalous_rows(card, 60, t0=t) + normal_rows(card, 200, t0=t + 60))
    watcher.state("active", 2, watch="passed")
    assert agent.streams[0].card.version == 2 and agent.fleet.rollbacks == 0



def test_alert_storm_model_fails_even_while_the_live_stream_is_in_an_anomaly(
        tmp_path, key, broker, watcher, start_agent, card):
    agent = start_agent(pub=key[1], canary_windows=40)
    rows = normal_rows(card, 300)
    _feed(broker.port, card, rows)  # warm-up done, the live stream is calibrated
    push(release(tmp_path, key[0], 2, (FLEET_DATA / "loud-ae.tflite").read_bytes()),
         broker.port)
    watcher.state("canary", 2)
    t = rows[-1]["ts"] + 1
    # The canary starts in the middle of a real anomaly: nearly every window is above
    # the live threshold, so a relative comparison alone would let anything through.
    _feed(broker.port, card, anomalous_rows(card, 200, t0=t) + normal_rows(card, 300, t0=t + 200))
    s = watcher.state("rejected", 2, code="canary_failed")
    assert agent.streams[0].card.version == 1, s


def test_good_model_with_another_score_scale_passes_and_keeps_the_alert_rate(
        tmp_path, key, broker, watcher, start_agent, card):
    cloud = Cloud(broker.port, "edge/dev1/alert/#")
    agent = start_agent(pub=key[1], canary_windows=60, watch_windows=60)
    st = agent.streams[0]
    rows = normal_rows(card, 300)
    _feed(broker.port, card, rows)
    live_threshold = st.threshold
    # The same network scored by mean absolute error: another scale (MAE, not MSE).
    push(release(tmp_path, key[0], 2, score={"kind": "reconstruction_mae"}), broker.port)
    watcher.state("canary", 2)
    t = rows[-1]["ts"] + 1
    more = normal_rows(card, 700, seed=1, t0=t)
    _feed(broker.port, card, more)
    watcher.state("active", 2, watch="passed")
    assert st.card.version == 2 and st.card.score_kind == "reconstruction_mae"
    assert st.threshold != pytest.approx(live_threshold, rel=0.05), "threshold not re-based"
    assert cloud.messages == [], "normal data alerted"
    t = more[-1]["ts"] + 1
    _feed(broker.port, card, anomalous_rows(card, 40, t0=t) + normal_rows(card, 200, t0=t + 40))
    assert cloud.wait_for(lambda c: any(b["event"] == "alert" for _, b in c.messages))
    alerts = [b for _, b in cloud.messages if b["event"] == "alert"]
    assert len(alerts) == 1 and alerts[0]["model_version"] == 2, alerts
    cloud.close()
