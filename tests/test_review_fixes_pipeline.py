"""Regressions found in review of the stream pipeline: each test failed before its fix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from agent import state
from agent.config import parse_config
from agent.daemon import Agent
from agent.fleet.canary import Trial, TrialPolicy
from agent.pipeline import Episode
from agent.scoring.slot import Calibration, ShadowBatch

from .conftest import REPO, agent_config


def _rows(card, n: int, seed: int = 0, fault: slice | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = card.mean + card.std * 0.3 * rng.standard_normal((n, len(card.mean)))
    if fault is not None:
        x[fault, 2] += card.std[2] * 25
    return x.astype(np.float32)


def _agent(tmp_path: Path, **stream) -> Agent:
    return Agent(parse_config(agent_config(tmp_path, 1883, **stream), base_dir=REPO))


def _feed(agent: Agent, x: np.ndarray, t0: float) -> list:
    st = agent.streams[0]
    ts = t0 + np.arange(len(x), dtype=np.float64)
    out = []
    for a in range(0, len(x), 32):
        out += agent.push(st, ts[a:a + 32], x[a:a + 32])
    return out


def test_a_restart_late_in_warm_up_recalibrates_instead_of_going_deaf(tmp_path, card):
    a = _agent(tmp_path, warmup=200)
    _feed(a, _rows(card, 190), 1e9)  # ten samples short of the end of warm-up
    a.save_state()
    a.outbox.close()
    assert not state.checkpoint_path(Path(a.state_dir), "pump").exists()
    b = _agent(tmp_path, warmup=200)
    events = _feed(b, _rows(card, 600, seed=1, fault=slice(450, 500)), 2e9)
    st = b.streams[0]
    assert st.threshold is not None and np.isfinite(st.threshold)
    assert any(isinstance(e, Episode) and e.kind == "alert" for e in events)
    b.outbox.close()


def test_a_damaged_checkpoint_is_set_aside_not_a_crash_loop(tmp_path, card, caplog):
    a = _agent(tmp_path)
    _feed(a, _rows(card, 300), 1e9)
    a.save_state()
    a.outbox.close()
    path = state.checkpoint_path(Path(a.state_dir), "pump")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the npz part cut short, as by a power cut
    with caplog.at_level(logging.WARNING):
        b = _agent(tmp_path)
    assert "corrupt checkpoint" in caplog.text
    assert b.streams[0].state == "warming_up" and path.with_suffix(".state.rejected").exists()
    b.outbox.close()


def test_a_swap_takes_its_calibration_at_once_and_keeps_it_across_a_restart(tmp_path, card):
    a = _agent(tmp_path, alert={"threshold": 0.5})
    _feed(a, _rows(card, 300), 1e9)
    st = a.streams[0]
    assert st.threshold == 0.5
    st.slot.swap(st.card, st.slot.scorer, Calibration(7.0, 0.5, 0.2))
    assert st.threshold == 7.0  # before any batch: a checkpoint now pairs them right
    a.save_state()
    a.outbox.close()
    b = _agent(tmp_path, alert={"threshold": 0.5})
    assert b.streams[0].threshold == 7.0
    b.outbox.close()


def test_a_reload_that_leaves_the_threshold_alone_keeps_the_adapted_one(tmp_path, card):
    a = _agent(tmp_path)
    _feed(a, _rows(card, 300), 1e9)
    st = a.streams[0]
    st.slot.swap(st.card, st.slot.scorer, Calibration(7.0, 0.5, 0.2))
    raw = agent_config(tmp_path, 1883)
    raw["streams"][0]["alert"] = {**raw["streams"][0].get("alert", {}), "consecutive": 2}
    assert a.reload(parse_config(raw, base_dir=REPO)) == []
    assert st.threshold == pytest.approx(7.0) and st.episodes.consecutive == 2
    a.outbox.close()


class _Scores:
    """A candidate whose scores are given per call (the canary only calls score)."""

    KEY = "fake"
    scaled = True
    learns = False

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = batches

    def score(self, windows: np.ndarray) -> np.ndarray:
        return self.batches.pop(0)


def test_canary_refuses_a_model_that_misses_what_the_live_model_flags():
    rng = np.random.default_rng(0)
    live = [rng.lognormal(0, 0.2, 20) for _ in range(10)]
    for b in live[5:]:
        b[:8] *= 50  # the live model flags 40 windows
    # The candidate follows the live model on normal windows but saturates on faults.
    cand = [np.minimum(b * 3, 3 * 1.5) for b in live]
    trial = Trial("canary", _Scores(cand), TrialPolicy(200, 1.0, 0.05))
    for b in live:
        trial(ShadowBatch(np.zeros((20, 16, 8), np.float32), b.astype(np.float32), 0.001, 5.0,
                          slot=None))  # type: ignore[arg-type]
    assert trial.result == "failed" and "windows the live model flags" in trial.reason


def test_a_sample_stamped_a_day_ahead_does_not_split_one_event_into_two_alerts():
    from agent.pipeline.episode import EpisodeOpened, EpisodeRule

    rule = EpisodeRule(consecutive=1, clear_windows=8, clear_ratio=0.8, cooldown_s=600)
    t = 1.7e9 + 4.0 * np.arange(40)
    t[5] += 86_400  # the event's first window is stamped a day ahead
    scores = np.r_[np.zeros(5), np.full(35, 3.0)]  # one event from window 5 on
    _, events = rule.update(scores, 1.0, t)
    assert [type(e) for e in events] == [EpisodeOpened]
