"""One contract for every adaptation component (river's checks/common.py habit).

Each component is driven through its river-shaped ``learn_one`` / ``score_one``
on dicts: it pickles mid-stream and carries on identically, the same seed gives
the same output, inputs are not mutated, and missing or unknown keys are
tolerated.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from agent.adapt import (
    DriftMonitor,
    FeedbackHead,
    GaussianDetector,
    HalfSpaceDetector,
    RunningScaler,
    ScoreCalibrator,
)

FIELDS = ("a", "b", "c")


def _scaler(seed: int) -> RunningScaler:
    z = np.zeros(3, np.float32)
    return RunningScaler("warmup", z, np.ones(3, np.float32), 20, FIELDS, halflife=50, seed=seed)


def _features(rng: np.random.Generator) -> dict[str, Any]:
    return {f: float(rng.normal(1.0, 0.5)) for f in FIELDS}


def _score(rng: np.random.Generator) -> dict[str, Any]:
    return {"score": float(rng.lognormal(0.0, 0.5))}


def _drift_x(rng: np.random.Generator) -> dict[str, Any]:
    return {**_score(rng), **_features(rng)}


def _hst_x(rng: np.random.Generator) -> dict[str, Any]:
    return {f: float(rng.uniform()) for f in FIELDS}


def _feedback_x(rng: np.random.Generator) -> dict[str, Any]:
    x: dict[str, Any] = _features(rng)
    if rng.uniform() < 0.2:
        x["label"] = "normal" if rng.uniform() < 0.5 else "anomaly"
    return x


Sample = Callable[[np.random.Generator], dict[str, Any]]
COMPONENTS: dict[str, tuple[Callable[[int], Any], Sample]] = {
    "RunningScaler": (_scaler, _features),
    "ScoreCalibrator": (lambda seed: ScoreCalibrator(halflife=30, seed=seed), _score),
    "DriftMonitor-adwin": (lambda seed: DriftMonitor(FIELDS, "adwin", seed=seed), _drift_x),
    "DriftMonitor-page_hinkley": (lambda seed: DriftMonitor(FIELDS, "page_hinkley", seed=seed),
                                  _drift_x),
    "FeedbackHead": (lambda seed: FeedbackHead(radius=0.5, seed=seed), _feedback_x),
    "HalfSpaceDetector": (lambda seed: HalfSpaceDetector(FIELDS, n_trees=5, height=5,
                                                         window_size=20, seed=seed), _hst_x),
    "GaussianDetector": (lambda seed: GaussianDetector(FIELDS, halflife=30, short=3, seed=seed),
                         _hst_x),
}


def _run(model: Any, xs: list[dict[str, Any]]) -> list[float]:
    out = []
    for x in xs:
        out.append(model.score_one(x))
        model.learn_one(x)
    return out


def _stream(sample: Callable[[np.random.Generator], dict[str, Any]], n: int, seed: int = 1
            ) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [sample(rng) for _ in range(n)]


@pytest.fixture(params=sorted(COMPONENTS))
def component(request: pytest.FixtureRequest) -> tuple[Callable[[int], Any], Any]:
    return COMPONENTS[request.param]


def test_pickle_round_trip_mid_stream_carries_on_identically(component):
    make, sample = component
    xs = _stream(sample, 120)
    a = make(7)
    _run(a, xs[:60])
    b = pickle.loads(pickle.dumps(a))
    assert _run(a, xs[60:]) == _run(b, xs[60:])


def test_same_seed_same_output(component):
    make, sample = component
    xs = _stream(sample, 100)
    first, second = _run(make(3), xs), _run(make(3), xs)
    assert first == second
    assert all(math.isfinite(v) for v in first)


def test_seed_is_used_where_something_is_random():
    xs = _stream(_hst_x, 100)
    make = COMPONENTS["HalfSpaceDetector"][0]
    assert _run(make(1), xs) != _run(make(2), xs)


def test_input_is_not_mutated(component):
    make, sample = component
    xs = _stream(sample, 60)
    before = copy.deepcopy(xs)
    _run(make(0), xs)
    assert xs == before


def test_missing_and_new_fields_are_tolerated(component):
    make, sample = component
    xs = _stream(sample, 80)
    m = make(0)
    _run(m, xs[:40])
    odd = []
    for i, x in enumerate(xs[40:]):
        y = dict(x)
        if y and i % 2 == 0:
            y.pop(sorted(y)[0])  # a missing field
        y[f"unknown_{i % 3}"] = 0.25  # a field it has never seen
        odd.append(y)
    assert all(math.isfinite(v) for v in _run(m, odd))
    assert all(math.isfinite(v) for v in _run(m, [{}]))


def test_batch_and_one_at_a_time_paths_agree_for_the_scaler():
    rng = np.random.default_rng(0)
    block = rng.normal(5.0, 2.0, (100, 3)).astype(np.float32)
    one, many = _scaler(0), _scaler(0)
    for row in block:
        one.learn_one(dict(zip(FIELDS, map(float, row), strict=True)))
    many.track(block[:20])
    for row in block[20:]:
        many.track(row[None, :])
    np.testing.assert_allclose(one.mean, many.mean, rtol=1e-6)
    np.testing.assert_allclose(one.std, many.std, rtol=1e-6)
