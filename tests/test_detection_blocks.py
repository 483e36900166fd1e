"""Detection building blocks on synthetic data: episodes, calibration, slow channels, PCA."""

from __future__ import annotations

import numpy as np
import pytest

from agent import state
from agent.pipeline.calibrate import Calibrator
from agent.pipeline.episode import EpisodeClosed, EpisodeOpened, EpisodeRule
from agent.pipeline.features import Scaling, slowness
from agent.scoring.base import StateError
from agent.scoring.pca import PcaDetector, PcaT2Q


def _ts(n: int, start: float = 0.0) -> np.ndarray:
    return start + 4.0 * np.arange(n, dtype=np.float64)


def _round_trip(obj, fresh):
    _, body, arrays = state.decode(state.encode({}, {"x": obj.to_state()}))
    fresh.load_state(state._restore(body, arrays)["x"])
    return fresh


# -- episodes ----------------------------------------------------------------------------


def test_episode_opens_after_consecutive_and_closes_with_hysteresis() -> None:
    rule = EpisodeRule(consecutive=3, clear_windows=2, clear_ratio=0.5, cooldown_s=0)
    s = np.array([0.1, 2, 2, 0.1, 2, 2, 2, 2, 0.8, 0.8, 0.8, 0.4, 0.4, 0.1])
    state_, ev = rule.update(s, 1.0, _ts(len(s)))
    # Two above, then a dip: not yet; three in a row opens at index 6.
    assert (state_ > 0).astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    opened, closed = ev
    assert isinstance(opened, EpisodeOpened) and isinstance(closed, EpisodeClosed)
    assert (opened.episode, opened.index, opened.started, opened.ts) == (1, 6, 16.0, 24.0)
    # Below the threshold but above 0.5 x threshold does not count towards clearing.
    assert closed.index == 12 and closed.ended == 48.0 and closed.duration_s == 32.0
    assert closed.peak_score == 2.0


def test_episode_cooldown_only_delays_the_next_opening() -> None:
    rule = EpisodeRule(consecutive=1, clear_windows=1, clear_ratio=1.0, cooldown_s=20)
    s = np.array([2, 0, 2, 2, 2, 2, 2, 0, 2])
    state_, ev = rule.update(s, 1.0, _ts(len(s)))
    opens = [e for e in ev if isinstance(e, EpisodeOpened)]
    # Opened at t=0; the second only at t >= 20 (index 5); index 8 (t=32) is within 20 s of it.
    assert [e.index for e in opens] == [0, 5]
    assert state_[2:5].tolist() == [0, 0, 0] and state_[5] == 2


def test_a_score_that_creeps_up_is_drift_not_an_episode() -> None:
    rule = EpisodeRule(consecutive=1, clear_windows=1, clear_ratio=0.8, onset_windows=5)
    creep = np.linspace(0.5, 1.5, 40)  # 16 windows between 0.8 and 1.0 before the crossing
    state_, ev = rule.update(creep, 1.0, _ts(40))
    assert ev == [] and not state_.any() and rule.drifting
    jump = np.array([0.5, 0.5, 3.0, 3.0])  # back to normal, then an abrupt fault
    state_, ev = rule.update(jump, 1.0, _ts(4, 200))
    assert [type(e) for e in ev] == [EpisodeOpened] and state_[2] == 1


def test_episode_state_round_trip_across_batches() -> None:
    rng = np.random.default_rng(1)
    s = rng.gamma(2.0, 0.5, 200)
    a = EpisodeRule(2, 3, 0.8, 10)
    whole, ev_whole = a.update(s, 1.2, _ts(200))
    b = EpisodeRule(2, 3, 0.8, 10)
    first, ev1 = b.update(s[:77], 1.2, _ts(77))
    b = _round_trip(b, EpisodeRule(2, 3, 0.8, 10))
    second, ev2 = b.update(s[77:], 1.2, _ts(123, 77 * 4.0))
    assert np.array_equal(whole, np.concatenate([first, second]))
    assert len(ev_whole) == len(ev1) + len(ev2)


# -- calibrator --------------------------------------------------------------------------


def _warm(c: Calibrator, raw: np.ndarray) -> None:
    c.learn_warm(c.smooth(raw))
    c.finish_warmup()


def test_calibrator_threshold_survives_a_short_fault_in_warmup() -> None:
    rng = np.random.default_rng(0)
    normal = rng.lognormal(0.0, 0.2, 100)
    faulty = normal.copy()
    faulty[40:46] = 50.0  # a short fault: six windows at 50x the normal score
    clean, dirty = Calibrator(threshold=None), Calibrator(threshold=None)
    _warm(clean, normal)
    _warm(dirty, faulty)
    assert clean.threshold is not None and dirty.threshold is not None
    assert dirty.threshold < 2 * clean.threshold
    # The same fault after warm-up is detected.
    sm = dirty.smooth(np.full(10, 50.0))
    assert np.all(sm[3:] > dirty.threshold) and np.all(dirty.calibrate(sm[3:]) > 0.5)


def test_calibrated_score_is_half_at_the_threshold_and_state_round_trips() -> None:
    c = Calibrator(threshold=None, smoothing=0.5, margin=1.2, halflife=50)
    _warm(c, np.linspace(1.0, 2.0, 60))
    thr = c.threshold
    assert thr is not None
    assert c.calibrate(np.array([thr]))[0] == pytest.approx(0.5)
    assert 0.0 <= c.calibrate(np.array([1e-9]))[0] < 0.5 < c.calibrate(np.array([1e9]))[0] <= 1
    c.smooth(np.ones(5))
    d = _round_trip(c, Calibrator(threshold=None, smoothing=0.5, margin=1.2, halflife=50))
    raw = np.array([1.0, 3.0, 0.5])
    assert np.allclose(c.smooth(raw), d.smooth(raw))
    c.adapt(np.full(500, 3.0))
    assert c.threshold is not None and thr < c.threshold <= 2 * thr + 1e-9


def test_fixed_threshold_is_kept() -> None:
    c = Calibrator(threshold=5.0)
    _warm(c, np.ones(20))
    assert c.threshold == 5.0


# -- features ----------------------------------------------------------------------------


def _drift_and_noise(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    drifting = 20 + 3 * np.sin(t / 150.0) + 0.01 * t + 0.05 * rng.standard_normal(n)
    noisy = 5 + rng.standard_normal(n)
    quantised = np.where(rng.random(n) < 0.8, 1.0, 2.0)
    return np.column_stack([drifting, noisy, quantised])


def _scaling(x: np.ndarray, transforms=None) -> Scaling:
    c = x.shape[1]
    sc = Scaling("warmup", np.zeros(c, np.float32), np.ones(c, np.float32), window=16,
                 transforms=transforms)
    sc.learn(x.astype(np.float32))
    sc.freeze()
    return sc


def test_slowness_finds_the_drifting_channel_only() -> None:
    x = _drift_and_noise()
    share = slowness(x, 16)
    assert share[0] > 0.9 and share[1] < 0.3 and share[2] < 0.3
    assert _scaling(x).transforms == ["diff", "level", "level"]
    assert _scaling(x, ["level", "diff", "auto"]).transforms == ["level", "diff", "level"]


def test_short_warmup_keeps_levels() -> None:
    assert _scaling(_drift_and_noise(40)).transforms == ["level", "level", "level"]


def test_scaling_ignores_level_drift_of_slow_channels_and_round_trips() -> None:
    x = _drift_and_noise()
    sc = _scaling(x)
    later = x[-16:].copy()
    later[:, 0] += 30.0  # the slow channel moved far from its warm-up level
    w = np.stack([x[-16:], later]).astype(np.float32)
    sc.apply(w)
    assert np.allclose(w[0], w[1], atol=1e-3)
    # Quantised channel: MAD is 0, the trimmed-std floor keeps the spread sane.
    assert 0.1 < sc.spread[2] < 1.0
    sc2 = _round_trip(sc, Scaling("warmup", np.zeros(3, np.float32), np.ones(3, np.float32),
                                  window=16))
    w2 = x[-16:][None].astype(np.float32)
    sc2.apply(w2)
    assert np.allclose(w2[0], w[0])


def test_scaling_follows_level_channels_when_asked() -> None:
    x = _drift_and_noise()
    c = x.shape[1]
    sc = Scaling("warmup", np.zeros(c, np.float32), np.ones(c, np.float32), window=16,
                 transforms=["level"] * c, halflife=10)
    sc.learn(x.astype(np.float32))
    sc.freeze()
    before = sc.center.copy()
    sc.track((x[:40] + np.array([0.0, 10.0, 0.0])).astype(np.float32))
    assert sc.center[1] > before[1] + 9.0 and sc.center[0] == pytest.approx(
        x[:40, 0].mean(), abs=3.0)


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


def test_pca_detector_scores_the_warm_up_out_of_fold_and_round_trips() -> None:
    rng = np.random.default_rng(4)
    warm = _correlated(200, rng)
    det = PcaDetector(n_fields=4, window=16, hop=4)
    assert not det.score(warm[:3]).any()  # unfitted: scores 0, it cannot alert
    oof = det.fit(warm)
    assert oof is not None and oof.shape == (200,)
    # Out of fold, the warm-up scores are not the (optimistic) in-sample ones.
    assert np.median(oof) > np.median(det.score(warm))
    det2 = _round_trip(det, PcaDetector(n_fields=4, window=16, hop=4))
    x = _correlated(20, rng)
    np.testing.assert_allclose(det2.score(x), det.score(x))


def test_recursive_pca_learns_a_new_normal_and_only_with_a_half_life() -> None:
    rng = np.random.default_rng(5)
    warm = _correlated(200, rng)

    def noisier(n: int) -> np.ndarray:  # the machine an hour later: field 3 jitters 3x more
        w = _correlated(n, rng)
        w[:, :, 3] *= 3.0
        return w

    adapting = PcaDetector(n_fields=4, window=16, hop=4, halflife=200)
    frozen = PcaDetector(n_fields=4, window=16, hop=4, halflife=0)
    adapting.fit(warm)
    frozen.fit(warm)
    probe = noisier(100)
    before = np.median(adapting.score(probe))
    for _ in range(20):
        batch = noisier(32)
        adapting.learn(batch)
        frozen.learn(batch)
    assert np.median(adapting.score(probe)) < 0.5 * before
    # halflife 0: the warm-up's projection stays (both detectors were fitted alike).
    assert np.median(frozen.score(probe)) == pytest.approx(before)


def test_recursive_pca_statistics_do_not_depend_on_batching() -> None:
    rng = np.random.default_rng(6)
    warm, later = _correlated(200, rng), _correlated(96, rng)
    dets = [PcaT2Q(n_fields=4, window=16, hop=4) for _ in range(3)]
    for det, size in zip(dets, (1, 7, 96), strict=True):
        det.fit(warm)
        for i in range(0, len(later), size):
            det.learn(later[i:i + size], halflife=50, every=10**9)  # no refit: stats only
    for det in dets[1:]:
        np.testing.assert_allclose(det.run_mean, dets[0].run_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(det.run_cov, dets[0].run_cov, rtol=1e-9, atol=1e-12)


def test_recursive_pca_bounds_what_a_far_out_window_teaches(monkeypatch) -> None:
    """The start of a fault that is still below the threshold is 'normal' to the
    stream; learnt at full weight it would inflate the covariance and hide the rest."""
    import agent.scoring.pca as pca_mod

    rng = np.random.default_rng(7)
    warm = _correlated(200, rng)
    fault = _correlated(40, rng)
    fault[:, :, 3] += 4.0

    def after_learning(huber: float) -> float:
        monkeypatch.setattr(pca_mod, "HUBER", huber)
        det = PcaT2Q(n_fields=4, window=16, hop=4)
        det.fit(warm)
        before = float(np.median(det.score(fault)))
        det.learn(fault[:32], halflife=1000, every=32)  # the shipped half-life
        return float(np.median(det.score(fault))) / before

    assert after_learning(3.0) > 0.8  # bounded influence: the fault still scores as one
    assert after_learning(np.inf) < 0.5  # unbounded: 32 windows already teach it away


def _with_slow(n_windows: int, rng: np.random.Generator, ramp: float) -> np.ndarray:
    """``_correlated`` plus a fifth, slow channel as the scaling hands it over (transform
    diff: each window's mean removed), ramping by ``ramp`` per sample."""
    w = _correlated(n_windows, rng)
    t = np.arange(16, dtype=np.float32) - 7.5
    slow = ramp * t[None, :] + 0.05 * rng.standard_normal((n_windows, 16)).astype(np.float32)
    return np.concatenate([w, slow[:, :, None]], axis=2).astype(np.float32)


def test_pca_leaves_slow_channels_out_unless_told_to_score_their_change() -> None:
    rng = np.random.default_rng(8)
    warm = _with_slow(200, rng, ramp=0.01)
    transforms = ["level"] * 4 + ["diff"]
    skip = PcaDetector(n_fields=5, window=16, hop=4)  # the default: slow="skip"
    change = PcaDetector(n_fields=5, window=16, hop=4, slow="change")
    for det in (skip, change):
        det.use_transforms(transforms)
        det.fit(warm)
    normal = _with_slow(50, rng, ramp=0.01)
    steep = normal.copy()
    steep[:, :, 4] *= 20.0  # the machine warms up faster: a steeper ramp, not a fault
    np.testing.assert_allclose(skip.score(steep), skip.score(normal))
    assert np.median(change.score(steep)) > 5 * np.median(change.score(normal))
    drop = normal.copy()
    drop[:, :, 1] -= 3.0  # a level channel falls: skipping the slow one does not hide it
    assert np.median(skip.score(drop)) > 5 * np.quantile(skip.score(normal), 0.9)


def test_pca_models_every_channel_when_none_or_all_are_slow() -> None:
    rng = np.random.default_rng(9)
    warm = _with_slow(100, rng, ramp=0.01)
    for transforms in (["level"] * 5, ["diff"] * 5):
        det = PcaDetector(n_fields=5, window=16, hop=4)
        det.use_transforms(transforms)
        det.fit(warm)
        assert det.channels is None and det.pca.n_fields == 5
    with pytest.raises(ValueError, match="5 fields"):
        PcaDetector(n_fields=5, window=16, hop=4).use_transforms(["level"] * 4)
    with pytest.raises(ValueError, match="slow must be one of"):
        PcaDetector(n_fields=5, window=16, hop=4, slow="ignore")


def test_pca_state_keeps_its_channels_and_reads_a_state_from_before_them() -> None:
    rng = np.random.default_rng(10)
    warm = _with_slow(100, rng, ramp=0.01)
    det = PcaDetector(n_fields=5, window=16, hop=4)
    det.use_transforms(["level"] * 4 + ["diff"])
    det.fit(warm)
    det2 = _round_trip(det, PcaDetector(n_fields=5, window=16, hop=4))
    assert det2.channels is not None and det2.channels.tolist() == [0, 1, 2, 3]
    x = _with_slow(20, rng, ramp=0.3)
    np.testing.assert_allclose(det2.score(x), det.score(x))
    # Saved before channels existed: it modelled every channel, as pca_slow "change"
    # does, so it loads there; a stream that now skips slow channels recalibrates.
    old = PcaDetector(n_fields=5, window=16, hop=4, slow="change")
    old.fit(warm)
    body = {k: v for k, v in old.to_state().items()
            if k not in ("channels", "stream_fields", "slow")}
    det3 = PcaDetector(n_fields=5, window=16, hop=4, slow="change")
    det3.load_state(body)
    assert det3.channels is None
    np.testing.assert_allclose(det3.score(x), old.score(x))
    with pytest.raises(StateError, match="pca_slow 'change'"):
        PcaDetector(n_fields=5, window=16, hop=4).load_state(body)
    # Another stream's state (6 fields) does not load.
    with pytest.raises(StateError, match="another stream shape"):
        PcaDetector(n_fields=6, window=16, hop=4).load_state(det.to_state())
