"""One contract for every scorer and stage (river's checks/common.py habit), on the production
path: the batch methods the pipeline calls, on windows cut from a pump-like recording.

Each component saves its state mid-stream through the real checkpoint encoding (JSON + npz,
no pickle) and a fresh copy restored from it carries on identically; the same seed gives the
same output; inputs are not mutated; outputs stay finite.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import state
from agent.config import parse_config
from agent.pipeline.calibrate import Calibrator
from agent.pipeline.episode import EpisodeRule
from agent.pipeline.features import Scaling
from agent.pipeline.feedback import FeedbackHead, window_summaries
from agent.pipeline.postprocess import PostProcessor
from agent.scoring import builtin_models_dir, detector_card, load_card, open_scorer

from .conftest import REPO, agent_config

WINDOW, HOP = 16, 4


def _windows(seed: int = 1, n: int = 120) -> np.ndarray:
    """(n, 16, 8) windows of a slowly drifting 8-channel signal with noise."""
    card = load_card(builtin_models_dir() / "skab-ae" / "model.json")
    rng = np.random.default_rng(seed)
    t = np.arange(n * HOP + WINDOW)
    x = card.mean + card.std * (0.5 * np.sin(t[:, None] / 30.0 + np.arange(8))
                                + 0.3 * rng.standard_normal((t.size, 8)))
    idx = np.arange(n)[:, None] * HOP + np.arange(WINDOW)
    return x[idx].astype(np.float32)


def _stream_cfg(tmp: Path, **over: Any) -> Any:
    raw = agent_config(tmp, 1883, **over)
    return parse_config(raw, base_dir=REPO).streams[0]


def _scaled(w: np.ndarray) -> np.ndarray:
    mu = w.mean(axis=(0, 1))
    sd = w.std(axis=(0, 1)) + 1e-9
    return ((w - mu) / sd).astype(np.float32)


class Runner:
    """Drives one component the way the pipeline does; ``step`` returns its outputs."""

    def __init__(self, make: Callable[[], Any], step: Callable[[Any, np.ndarray], Any],
                 data: Callable[[int], np.ndarray]) -> None:
        self.make, self.step, self.data = make, step, data


def _scorer(detector: str | None, fields: int = 8) -> Callable[[], Any]:
    def make() -> Any:
        tmp = Path("/nonexistent")
        if detector is None:
            s = _stream_cfg(tmp)
            return open_scorer(load_card(builtin_models_dir() / "skab-ae" / "model.json"), s)
        names = ["value"] if fields == 1 else None
        s = _stream_cfg(tmp, model="none", warmup=2000,
                        **({"fields": names} if names else {}),
                        adapt={"detector": detector, "hst_window": 20})
        return open_scorer(detector_card(detector, detector, s.window, tuple(s.fields)), s)

    return make


def _score_step(m: Any, w: np.ndarray) -> Any:
    out = m.score(w)
    m.learn(w)
    return out


def _calibrator() -> Calibrator:
    return Calibrator(threshold=None, smoothing=0.3, halflife=30, seed=3)


def _cal_step(cal: Calibrator, w: np.ndarray) -> Any:
    raw = np.abs(w).mean(axis=(1, 2)).astype(np.float64)
    sm = cal.smooth(raw)
    if cal.warm and cal._n_warm < 40:
        cal.learn_warm(sm)
        return sm
    cal.finish_warmup()
    cal.adapt(sm[sm <= (cal.threshold or np.inf)])
    return np.concatenate([sm, cal.calibrate(sm)])


def _episode_step(rule: EpisodeRule, w: np.ndarray) -> Any:
    raw = np.abs(w).mean(axis=(1, 2)).astype(np.float64)
    state, events = rule.update(raw, float(np.median(raw)), np.arange(len(raw), dtype=float))
    return np.concatenate([state, [len(events)]]).astype(np.float64)


def _scaling() -> Scaling:
    z = np.zeros(8, np.float32)
    return Scaling("warmup", z, z + 1, window=WINDOW, halflife=200)


def _scaling_step(sc: Scaling, w: np.ndarray) -> Any:
    block = w[:, -HOP:].reshape(-1, w.shape[2])
    if not sc.frozen and sc._kept < 200:
        sc.learn(block)
        return np.zeros(1)
    sc.freeze()
    sc.track(block)
    out = w.copy()
    sc.apply(out)
    return out


class _Post:
    """PostProcessor as the pipeline holds it (restored with from_state)."""

    def __init__(self) -> None:
        self.p = PostProcessor(rest_windows=10, warmup_windows=5)

    def to_state(self) -> dict[str, Any]:
        return self.p.to_state()

    def load_state(self, s: dict[str, Any]) -> None:
        self.p = PostProcessor.from_state(s)


def _post_step(pp: _Post, w: np.ndarray) -> Any:
    raw = np.abs(w[:, -1, 0] - w[:, :, 0].mean(axis=1)).astype(np.float64)
    return pp.p.process(raw, w[:, -1, 0].astype(np.float64))


def _pca_step(m: Any, w: np.ndarray) -> Any:
    if not m.fitted:
        return m.fit(w)
    s = m.score(w)
    m.learn(w)  # the recursive PCA's running statistics are state too
    return s


def _feedback() -> FeedbackHead:
    return FeedbackHead(radius=2.0)


def _feedback_step(fb: FeedbackHead, w: np.ndarray) -> Any:
    scaled = _scaled(w)
    ts = np.arange(len(w), dtype=float) + fb.labels["normal"] * 1000
    fb.remember(ts, scaled)
    if fb._held > 50 and not fb.prototypes:
        fb.label(float(ts[-5]), "normal")
    return fb.adjust(np.ones(len(w)), window_summaries(scaled), 0.1)


def _one(seed: int) -> np.ndarray:
    return _windows(seed)[:, :, 7:8].copy()


COMPONENTS: dict[str, Runner] = {
    "wgauss": Runner(_scorer("wgauss", 1), _score_step, _one),
    "artime": Runner(_scorer("artime", 1), _score_step, _one),
    "knn": Runner(_scorer("knn", 1), _score_step, _one),
    "PcaDetector": Runner(_scorer("pca"), _pca_step, lambda s: _scaled(_windows(s))),
    "PostProcessor": Runner(_Post, _post_step, _one),
    "ModelScorer(skab-ae)": Runner(_scorer(None), _score_step, lambda s: _scaled(_windows(s))),
    "GaussianDetector": Runner(_scorer("gaussian"), _score_step, _windows),
    "HalfSpaceDetector": Runner(_scorer("hst"), _score_step, lambda s: _scaled(_windows(s))),
    "Calibrator": Runner(_calibrator, _cal_step, _windows),
    "EpisodeRule": Runner(EpisodeRule, _episode_step, _windows),
    "Scaling": Runner(_scaling, _scaling_step, _windows),
    "FeedbackHead": Runner(_feedback, _feedback_step, _windows),
}


def _run(r: Runner, m: Any, w: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(r.step(m, w[i:i + 8]), dtype=np.float64) for i in range(0, len(w), 8)]


def _round_trip(m: Any, fresh: Any) -> Any:
    blob = state.encode({"schema": state.SCHEMA}, {"c": m.to_state()})
    _, body, arrays = state.decode(blob)
    fresh.load_state(state._restore(body, arrays)["c"])
    return fresh


@pytest.fixture(params=sorted(COMPONENTS))
def runner(request: pytest.FixtureRequest) -> Runner:
    return COMPONENTS[request.param]


def test_state_round_trip_mid_stream_carries_on_identically(runner: Runner) -> None:
    w = runner.data(1)
    a = runner.make()
    _run(runner, a, w[:64])
    b = _round_trip(a, runner.make())
    for x, y in zip(_run(runner, a, w[64:]), _run(runner, b, w[64:]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_same_seed_same_output_and_finite(runner: Runner) -> None:
    w = runner.data(2)
    first, second = _run(runner, runner.make(), w), _run(runner, runner.make(), w)
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)
        assert np.all(np.isfinite(x))


def test_input_is_not_mutated(runner: Runner) -> None:
    w = runner.data(3)
    before = copy.deepcopy(w)
    _run(runner, runner.make(), w)
    np.testing.assert_array_equal(w, before)


def test_hst_seed_is_used() -> None:
    tmp = Path("/nonexistent")
    w = _scaled(_windows(4))
    outs = []
    for seed in (1, 2):
        s = _stream_cfg(tmp, model="none", warmup=2000, adapt={"detector": "hst", "hst_window": 20,
                                                   "seed": seed})
        m = open_scorer(detector_card("hst", "hst", s.window, tuple(s.fields)), s)
        outs.append(np.concatenate([_score_step(m, w[i:i + 8]) for i in range(0, len(w), 8)]))
    assert not np.array_equal(outs[0], outs[1])
