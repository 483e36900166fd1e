"""Detection building blocks on synthetic data: episodes, calibration, slow channels, PCA."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.pipeline.calibrate import Calibrator
from agent.pipeline.channels import ChannelScaler, slowness
from agent.pipeline.episode import EpisodeClosed, EpisodeOpened, EpisodeRule
from agent.scoring.pca import PcaT2Q


def _ts(n: int, start: float = 0.0) -> np.ndarray:
    return start + 4.0 * np.arange(n, dtype=np.float64)


# -- episodes ----------------------------------------------------------------------------


def test_episode_opens_after_consecutive_and_closes_with_hysteresis() -> None:
    rule = EpisodeRule(consecutive=3, clear_windows=2, clear_ratio=0.5, cooldown_s=0)
    s = np.array([0.1, 2, 2, 0.1, 2, 2, 2, 2, 0.8, 0.8, 0.8, 0.4, 0.4, 0.1])
    state, ev = rule.update(s, 1.0, _ts(len(s)))
    # Two above, then a dip: not yet; three in a row opens at index 6.
    assert state.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert state.dtype == np.int8
    opened, closed = ev
    assert isinstance(opened, EpisodeOpened) and isinstance(closed, EpisodeClosed)
    assert (opened.episode, opened.index, opened.started, opened.ts) == (1, 6, 16.0, 24.0)
    # Below the threshold but above 0.5 x threshold does not count towards clearing.
    assert closed.index == 12 and closed.ended == 48.0 and closed.duration_s == 32.0
    assert closed.peak_score == 2.0


def test_episode_cooldown_only_delays_the_next_opening() -> None:
    rule = EpisodeRule(consecutive=1, clear_windows=1, clear_ratio=1.0, cooldown_s=20)
    s = np.array([2, 0, 2, 2, 2, 2, 2, 0, 2])
    state, ev = rule.update(s, 1.0, _ts(len(s)))
    opens = [e for e in ev if isinstance(e, EpisodeOpened)]
    # Opened at t=0; the second only at t >= 20 (index 5); index 8 (t=32) is within 20 s of it.
    assert [e.index for e in opens] == [0, 5]
    assert state[2:5].tolist() == [0, 0, 0] and state[5] == 1


def test_episode_state_round_trip_across_batches() -> None:
    rng = np.random.default_rng(1)
    s = rng.gamma(2.0, 0.5, 200)
    a = EpisodeRule(2, 3, 0.8, 10)
    whole, ev_whole = a.update(s, 1.2, _ts(200))
    b = EpisodeRule(2, 3, 0.8, 10)
    first, ev1 = b.update(s[:77], 1.2, _ts(77))
    b = EpisodeRule.from_state(json.loads(json.dumps(b.to_state())))
    second, ev2 = b.update(s[77:], 1.2, _ts(123, 77 * 4.0))
    assert np.array_equal(whole, np.concatenate([first, second]))
    assert len(ev_whole) == len(ev1) + len(ev2)


# -- calibrator --------------------------------------------------------------------------


def test_calibrator_threshold_survives_a_short_fault_in_warmup() -> None:
    rng = np.random.default_rng(0)
    normal = rng.lognormal(0.0, 0.2, 100)
    faulty = normal.copy()
    faulty[40:46] = 50.0  # a short fault: six windows at 50x the normal score
    clean, dirty = Calibrator(), Calibrator()
    clean.warm(normal)
    dirty.warm(faulty)
    clean.finish_warmup()
    dirty.finish_warmup()
    assert clean.threshold is not None and dirty.threshold is not None
    assert dirty.threshold < 2 * clean.threshold
    # The same fault after warm-up is detected.
    sm, cal = dirty.update(np.full(10, 50.0))
    assert np.all(sm[3:] > dirty.threshold) and np.all(cal[3:] > 0.5)


def test_calibrated_score_is_half_at_the_threshold_and_state_round_trips() -> None:
    c = Calibrator(smoothing=0.5, margin=1.2, adapt_halflife=50)
    c.warm(np.linspace(1.0, 2.0, 60))
    c.finish_warmup()
    thr = c.threshold
    assert thr is not None
    assert c.calibrate(np.array([thr]))[0] == pytest.approx(0.5)
    assert 0.0 <= c.calibrate(np.array([1e-9]))[0] < 0.5 < c.calibrate(np.array([1e9]))[0] <= 1
    c.update(np.ones(5))
    d = Calibrator.from_state(json.loads(json.dumps(c.to_state())))
    raw = np.array([1.0, 3.0, 0.5])
    assert np.allclose(c.update(raw)[0], d.update(raw)[0])
    c.adapt(np.full(500, 3.0))
    assert c.threshold is not None and thr < c.threshold <= 2 * thr + 1e-9


def test_fixed_threshold_is_kept() -> None:
    c = Calibrator(threshold=5.0)
    c.warm(np.ones(20))
    c.finish_warmup()
    assert c.threshold == 5.0


# -- channels ----------------------------------------------------------------------------


def _drift_and_noise(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    drifting = 20 + 3 * np.sin(t / 150.0) + 0.01 * t + 0.05 * rng.standard_normal(n)
    noisy = 5 + rng.standard_normal(n)
    quantised = np.where(rng.random(n) < 0.8, 1.0, 2.0)
    return np.column_stack([drifting, noisy, quantised])


def test_slowness_finds_the_drifting_channel_only() -> None:
    x = _drift_and_noise()
    share = slowness(x, 16)
    assert share[0] > 0.9 and share[1] < 0.3 and share[2] < 0.3
    sc = ChannelScaler(16).fit(x)
    assert sc.transforms == ["diff", "level", "level"]
    assert ChannelScaler(16, ["level", "diff", "auto"]).fit(x).transforms == [
        "level", "diff", "level"]


def test_short_warmup_keeps_levels() -> None:
    sc = ChannelScaler(16).fit(_drift_and_noise(40))
    assert sc.transforms == ["level", "level", "level"]


def test_scaler_ignores_level_drift_of_slow_channels_and_round_trips() -> None:
    x = _drift_and_noise()
    sc = ChannelScaler(16, track_halflife=0).fit(x)
    later = x[-16:].copy()
    later[:, 0] += 30.0  # the slow channel moved far from its warm-up level
    w = np.stack([x[-16:], later]).astype(np.float32)
    sc.apply(w)
    assert np.allclose(w[0], w[1], atol=1e-3)
    # Quantised channel: MAD is 0, the trimmed-std floor keeps the spread sane.
    assert 0.1 < 1.0 / sc.inv[2] < 1.0
    sc2 = ChannelScaler.from_state(json.loads(json.dumps(sc.to_state())))
    w2 = np.stack([x[-16:]]).astype(np.float32)
    sc2.apply(w2)
    assert np.allclose(w2[0], w[0])


def test_scaler_tracks_level_on_normal_windows_only() -> None:
    x = _drift_and_noise()
    sc = ChannelScaler(16, ["level", "level", "level"], track_halflife=1.0,
                       stuck_factor=1e9).fit(x)
    before = sc.center.copy()
    w = (x[:16] + np.array([0.0, 10.0, 0.0])).astype(np.float32)[None]
    sc.apply(w.copy())
    sc.adapt(np.array([False]))
    assert sc.center[1] == pytest.approx(before[1], abs=1e-3)
    sc.apply(w.copy())
    sc.adapt(np.array([True]))
    assert sc.center[1] > before[1] + 4.0


# -- PCA ---------------------------------------------------------------------------------


def _correlated(n_windows: int, rng: np.random.Generator) -> np.ndarray:
    """Windows of 4 fields driven by two latent factors that move between windows."""
    z = np.repeat(rng.standard_normal((n_windows, 1, 2)), 16, axis=1)
    z = z + 0.3 * rng.standard_normal((n_windows, 16, 2))
    f = np.stack([z[..., 0], z[..., 0] + 0.1 * z[..., 1], -z[..., 0], z[..., 1]], axis=-1)
    return (f + 0.05 * rng.standard_normal(f.shape)).astype(np.float32)


@pytest.mark.parametrize("features", ["samples", "summary"])
def test_pca_flags_a_broken_correlation(features: str) -> None:
    rng = np.random.default_rng(3)
    warm = _correlated(400, rng)
    warm[:5] += 8.0  # a short fault in the warm-up must not be learnt
    det = PcaT2Q(n_fields=4, window=16, hop=4, features=features)
    oof = det.fit_scores(warm)
    assert oof.shape == (400,) and np.all(np.isfinite(oof))
    normal = _correlated(50, rng)
    broken = normal.copy()
    broken[:, :, 1] = -broken[:, :, 1]  # same marginal spread, correlation with field 0 inverted
    s_normal, s_broken = det.score(normal), det.score(broken)
    assert np.median(s_broken) > 5 * np.quantile(s_normal, 0.9)
    det2 = PcaT2Q.from_state(json.loads(json.dumps(det.to_state())))
    assert np.allclose(det2.score(broken), s_broken)
