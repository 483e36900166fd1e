"""Univariate detectors and the post-processing stage: state, sensitivity, bounds, NaN safety."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest

from agent.pipeline.postprocess import (
    AnomalyLikelihood,
    PostProcessor,
    RangeRule,
    RestPeriod,
)
from agent.scoring.artime import ArtimeDetector
from agent.scoring.gauss import WindowedGaussianDetector
from agent.scoring.knn import KnnDetector

DETECTORS: list[Any] = [WindowedGaussianDetector, ArtimeDetector, KnnDetector]
WINDOW = 8


def windows(x: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """(n, window, 1) float32 sliding windows, hop 1."""
    v = x.astype(np.float32)
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(v, window)[:, :, None])


def stream(det: Any, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Feed windows in batches the way the pipeline does; one score per window."""
    w = windows(x)
    return np.concatenate([det.score(w[a:a + batch]) for a in range(0, len(w), batch)])


def signal(n: int = 3000, seed: int = 1) -> np.ndarray:
    """A daily-like sine on an offset with mild noise: nothing unusual in it."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 50.0 + 10.0 * np.sin(2 * np.pi * t / 288) + rng.normal(0, 0.5, n)


@pytest.mark.parametrize("cls", DETECTORS)
def test_state_round_trip_gives_identical_future_scores(cls: Any) -> None:
    x = signal()
    x[2200] += 40.0
    det = cls(hop=1, warmup=150)
    stream(det, x[:1500])
    state = pickle.loads(pickle.dumps(det.to_state()))
    for v in state.values():
        assert v is None or isinstance(v, (str, int, float, bool, list, dict, np.ndarray))
    twin = cls.from_state(copy.deepcopy(state))
    # Both continue from the same point: the first window after the cut has only `hop` new data.
    rest = windows(x)[1500 - WINDOW + 1:]
    a = np.concatenate([det.score(rest[i:i + 32]) for i in range(0, len(rest), 32)])
    b = np.concatenate([twin.score(rest[i:i + 32]) for i in range(0, len(rest), 32)])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls", DETECTORS)
@pytest.mark.parametrize("kind", ["spike", "level"])
def test_spike_and_level_shift_score_above_noise(cls: Any, kind: str) -> None:
    x = signal()
    at = 2000
    if kind == "spike":
        x[at] += 30.0
    else:
        x[at:] -= 25.0
    s = stream(cls(hop=1, warmup=150), x)
    end = at - (WINDOW - 1)  # index of the first window that contains the change
    near = s[end:end + 40].max()
    quiet = np.r_[s[300:end - 40]]
    assert near > np.quantile(quiet, 0.999)
    assert near > 0


def test_artime_category_cap_holds() -> None:
    rng = np.random.default_rng(3)
    det = ArtimeDetector(hop=1, warmup=100, max_categories=8, rho=0.99)
    stream(det, rng.normal(size=4000))
    assert det.n_cat == 8
    st = det.to_state()
    assert st["lower"].shape[0] == 8 and det.lower.shape[0] == 8


@pytest.mark.parametrize("cls", DETECTORS)
def test_state_size_is_bounded(cls: Any) -> None:
    rng = np.random.default_rng(4)
    det = cls(hop=1, warmup=100)
    stream(det, rng.normal(size=3000))
    small = len(pickle.dumps(det.to_state()))
    stream(det, rng.normal(size=12000))
    assert len(pickle.dumps(det.to_state())) <= max(small, 1) * 1.05 + 1024


@pytest.mark.parametrize("cls", DETECTORS)
def test_nan_free(cls: Any) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=2000)
    x[::97] = np.nan
    x[500:520] = 7.0  # flat stretch
    x[1000] = 1e6
    s = stream(cls(hop=1, warmup=100), x)
    assert np.all(np.isfinite(s)) and np.all(s >= 0)
    flat = stream(cls(hop=1, warmup=100), np.full(1000, 3.0))
    assert np.all(np.isfinite(flat)) and np.all(flat[100:] == 0)


def test_detector_range_is_learned_not_given() -> None:
    det = ArtimeDetector(hop=1, warmup=100)
    stream(det, signal(500))
    lo, hi = det.lo, det.hi
    stream(det, np.full(50, 200.0))
    assert det.lo == lo and det.hi == 200.0 > hi


# -- post-processing ----------------------------------------------------------------------


def _pp_input(n: int = 3000, seed: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = np.abs(rng.normal(0, 0.05, n))
    raw[2000:2005] = 0.9
    vals = rng.normal(10, 1, n)
    vals[2500] = 30.0
    return raw, vals


def _run(pp: PostProcessor, raw: np.ndarray, vals: np.ndarray) -> np.ndarray:
    return np.concatenate([pp.process(raw[a:a + 32], vals[a:a + 32])
                           for a in range(0, len(raw), 32)])


def test_postprocessor_final_score_and_round_trip() -> None:
    raw, vals = _pp_input()
    pp = PostProcessor(likelihood=True, rest_windows=120, range_rule=True, warmup_windows=150)
    a = _run(pp, raw[:1600], vals[:1600])
    twin = PostProcessor.from_state(pickle.loads(pickle.dumps(pp.to_state())))
    b1, b2 = _run(pp, raw[1600:], vals[1600:]), _run(twin, raw[1600:], vals[1600:])
    np.testing.assert_array_equal(b1, b2)
    s = np.r_[a, b1]
    assert np.all((s >= 0) & (s <= 1)) and np.all(np.isfinite(s))
    assert np.all(s[:150] == 0)  # warm-up
    assert s[2000:2010].max() >= pp.trigger  # the raw burst
    assert s[2500] == 1.0  # beyond the running range
    # A detection rests the score for the following windows.
    first = 2000 + int(np.argmax(s[2000:2010] >= pp.trigger))
    assert np.all(s[first + 1:first + 121] == 0)


def test_likelihood_is_quiet_on_steady_scores() -> None:
    rng = np.random.default_rng(7)
    lik = AnomalyLikelihood()
    s = lik.process(np.abs(rng.normal(0, 0.05, 5000)))
    assert s.max() < 0.5
    assert lik.process(np.full(10, 1.0)).max() >= 0.5


def test_range_rule_and_rest_period() -> None:
    rr = RangeRule(frac=0.1)
    # The first values have no range yet: that is what the warm-up is for.
    out = rr.process(np.array([0.0, 10.0, 5.0, 10.5, 12.0, -2.0]))
    np.testing.assert_array_equal(out, [0, 1, 0, 0, 1, 1])
    rp = RestPeriod(windows=2, trigger=0.5)
    np.testing.assert_array_equal(rp.process(np.array([0.1, 0.6, 0.9, 0.9, 0.7, 0.2])),
                                  [0.1, 0.6, 0, 0, 0.7, 0])
    assert RestPeriod.from_state(rp.to_state()).left == rp.left


def test_multichannel_use_without_range_rule() -> None:
    raw, _ = _pp_input()
    pp = PostProcessor(likelihood=True, rest_windows=50, range_rule=False)
    s = pp.process(raw)
    assert np.all(np.isfinite(s)) and s.max() >= pp.trigger
