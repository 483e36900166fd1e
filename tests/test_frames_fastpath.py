"""The f32 frame path's shortcuts give the very bits of the plain path (issue 13, perf-f32).

``tests/test_frames_equivalence.py`` compares whole runs with a recording within float
rounding; these compare each shortcut with the code it stands in for, bit for bit, on
values that include the awkward ones (infinities, NaN, signed zeros, huge readings), and
check that how many windows one ring read takes changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import agent.pipeline.stream as stream_module
from agent.pipeline.features import Scaling

from .frames_recording import CASES, run_case


def _config(tmp_path: Path) -> Any:
    """An agent config with one stream of the recording's fields, default settings but
    batch 32 (the tests count batches of a frame of 256 samples: 64 windows, 2 batches)."""
    from agent.config import parse_config

    from .frames_recording import FIELDS, REPO

    return parse_config({"device_id": "d", "state_dir": str(tmp_path),
                         "local": {"host": "127.0.0.1", "port": 1},
                         "upstream": {"host": "127.0.0.1", "port": 1},
                         "streams": [{"name": "s", "topic": "t", "fields": FIELDS,
                                      "batch": 32}]},
                        base_dir=REPO)


def _awkward_windows(n: int, window: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, window, channels)) * 10 + 100).astype(np.float32)
    flat = w.reshape(-1)
    picks = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
    flat[picks] = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 3e38, -3e38, 1e-45,
                            -1e-45, 65504.0, 1e30, -1e30], np.float32)[:picks.size]
    return w


def _scaling(transforms: list[str], window: int) -> Scaling:
    c = len(transforms)
    rng = np.random.default_rng(1)
    s = Scaling("model", (rng.standard_normal(c) * 5).astype(np.float32),
                (rng.random(c) + 0.1).astype(np.float32), window=window, transforms=transforms)
    s.center[0] = 1e-3  # a centre that float32 does not hold exactly
    s.use_card(s.center.astype(np.float32), s.spread.astype(np.float32))
    return s


TRANSFORMS = {
    "adjacent diff": ["level"] * 4 + ["diff", "diff"] + ["level"] * 2,
    "scattered diff": ["diff", "level", "diff", "level", "level", "diff", "level", "level"],
    "all diff": ["diff"] * 3,
    "no diff": ["level"] * 5,
}


@pytest.mark.parametrize("kind", list(TRANSFORMS))
@pytest.mark.parametrize("window", [1, 12, 16])
def test_apply_with_offsets_is_apply(kind: str, window: int) -> None:
    transforms = TRANSFORMS[kind]
    s = _scaling(transforms, window)
    raw = _awkward_windows(70, window, len(transforms), seed=window)
    want = raw.copy()
    with np.errstate(all="ignore"):
        s.apply(want)
        off = np.full_like(raw, 7.0)  # whatever was there before is overwritten
        s.offsets(raw, off)
        got = raw.copy()
        s.apply(got, offsets=off)
    assert got.tobytes() == want.tobytes()
    assert s.delevels == ("diff" in transforms)


def test_offsets_of_a_block_are_those_of_each_window() -> None:
    s = _scaling(TRANSFORMS["scattered diff"], 16)
    raw = _awkward_windows(256, 16, 8, seed=5)
    block = np.empty_like(raw)
    with np.errstate(all="ignore"):
        s.offsets(raw, block)
        for n in (1, 7, 32, 64):
            for a in range(0, 256, n):
                part = np.empty_like(raw[a:a + n])
                s.offsets(raw[a:a + n], part)
                assert part.tobytes() == block[a:a + n].tobytes(), (n, a)


def test_apply_ignores_offsets_that_do_not_fit() -> None:
    """Offsets of another shape, or windows that are not contiguous: the plain path."""
    s = _scaling(TRANSFORMS["adjacent diff"], 16)
    raw = _awkward_windows(8, 16, 8, seed=6)
    want = raw.copy()
    with np.errstate(all="ignore"):
        s.apply(want)
        got = raw.copy()
        s.apply(got, offsets=np.zeros((4, 16, 8), np.float32))
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("name", list(CASES))
def test_results_do_not_depend_on_how_many_windows_a_read_takes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Work done once per ring read (de-levelling offsets and the like) gives each batch
    what it would have got alone: one batch per read changes no bit of any output."""
    many = run_case(name, tmp_path / "many")
    monkeypatch.setattr(stream_module, "READ_WINDOWS", 1)  # one batch per read
    one = run_case(name, tmp_path / "one")
    assert sorted(one) == sorted(many)
    for key in many:
        assert one[key].tobytes() == many[key].tobytes(), key


def _tracking_scaling(transforms: list[str]) -> Scaling:
    c = len(transforms)
    s = Scaling("warmup", np.zeros(c, np.float32), np.ones(c, np.float32), window=16,
                transforms=transforms, halflife=100)
    s.learn(_awkward_windows(40, 16, c, seed=8).reshape(-1, c).clip(-1e3, 1e3))
    s.freeze()
    return s


@pytest.mark.parametrize("kind", ["adjacent diff", "scattered diff", "no diff"])
def test_track_columns_is_track(kind: str) -> None:
    """The pipeline hands track the batch's columns as a view of a whole read's: the
    centre moves to the same bits as track(block), and diff channels' centre stays."""
    from agent.pipeline.features import columns

    transforms = TRANSFORMS[kind]
    c = len(transforms)
    a, b = _tracking_scaling(transforms), _tracking_scaling(transforms)
    diff = np.array([t == "diff" for t in transforms])
    before = a.center.copy()
    raw = _awkward_windows(96, 4, c, seed=9)
    raw[np.isnan(raw)] = 1.0  # frames hold no NaN; the rest of the awkward values stay
    read = columns(raw.reshape(-1, c))  # a read of 96 windows at hop 4
    with np.errstate(all="ignore"):
        for lo in range(0, 96, 32):
            a.track(raw[lo:lo + 32].reshape(-1, c))
            b.track_columns(read[:, lo * 4:(lo + 32) * 4])
            assert a.center.tobytes() == b.center.tobytes()
            assert a._center_rows.tobytes() == b._center_rows.tobytes()
    assert a.center[diff].tobytes() == before[diff].tobytes()
    assert (a.center[~diff] != before[~diff]).any()


def test_litert_quantises_as_the_reference_arithmetic() -> None:
    """The int8 input the backend hands LiteRT is round(x / scale) + zero clamped to the
    type's range, for values at rounding ties, beyond the range and infinite."""
    from agent.scoring import builtin_models_dir, load_card
    from agent.scoring.litert import LiteRTBackend

    card = load_card(builtin_models_dir() / "skab-ae" / "model.json")
    be = LiteRTBackend(card.path, 32)
    scale, zero = be.quantization["input"] or (1.0, 0)
    rng = np.random.default_rng(10)
    for n in (32, 5, 1):
        x = (rng.standard_normal((n, *be.input_shape)) * 10).astype(np.float32)
        flat = x.reshape(-1)
        flat[:8] = [np.inf, -np.inf, 0.5 * scale, -0.5 * scale, 1.5 * scale, -0.0, 1e30, -1e30]
        be.predict(x)
        with np.errstate(all="ignore"):
            want = np.clip(np.rint(np.float32(x / np.float32(scale))) + zero, -128, 127)
        got = be._in_buf[:n]
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, want.astype(np.int8))
        assert not be._in_buf[n:].any()  # the padding of a partial batch
        # A float64 batch is divided in float64 by the Python scale, as it always was.
        x64 = x.astype(np.float64) / 3.0
        be.predict(x64)
        with np.errstate(all="ignore"):
            want = np.clip(np.rint((x64 / scale).astype(np.float32)) + zero, -128, 127)
        np.testing.assert_array_equal(be._in_buf[:n], want.astype(np.int8))


def test_model_scores_overflow_to_infinity_quietly() -> None:
    """A reconstruction error beyond float32 becomes an infinite score without a warning
    (the pipeline counts and caps it); ordinary ones are the float64 mean in float32."""
    import warnings

    from agent.scoring import builtin_models_dir, load_card
    from agent.scoring.litert import LiteRTBackend
    from agent.scoring.model import ModelScorer

    card = load_card(builtin_models_dir() / "skab-ae" / "model.json")
    scorer = ModelScorer(card, LiteRTBackend(card.path, 32))
    w = np.random.default_rng(14).standard_normal((6, 16, 8)).astype(np.float32)
    w[1, 3, 2] = 1e37  # its square is far beyond float32; the model input is not
    w[2, 0, 0] = 1e20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = scorer.score(w)
    out = scorer.backend.predict(w.reshape(6, -1))
    want = (np.subtract(out, w.reshape(6, -1), dtype=np.float64) ** 2).mean(axis=1)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got, want.astype(np.float32))
    assert np.isinf(got[1]) and np.isfinite(got[[0, 2, 3, 4, 5]]).all()


def _sanitised_reference(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """What _sanitise did with every score before its one-call check."""
    out = raw.copy()
    bad = ~np.isfinite(out)
    np.nan_to_num(out, copy=False, nan=stream_module.SCORE_MAX, posinf=stream_module.SCORE_MAX,
                  neginf=0.0)
    np.minimum(out, stream_module.SCORE_MAX, out=out)
    return out, int(bad.sum())


def test_sanitise_takes_its_shortcut_only_when_nothing_changes(tmp_path: Path) -> None:
    """Scores near and beyond the shortcut's bound (1.8e19, float32's largest square root),
    beyond SCORE_MAX, negative, infinite or NaN come out as the full check makes them."""
    from agent.scoring.registry import open_stream_model

    cfg = _config(tmp_path)
    card, scorer = open_stream_model(cfg, cfg.streams[0])
    p = stream_module.StreamPipeline(cfg.streams[0], card, scorer)
    rng = np.random.default_rng(11)
    specials = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 2e30, 1e30, 1.9e19, 1.8e19,
                         -1.9e19, 1e10, -5.0, 0.0, -0.0, 1e-45], np.float32)
    counted = 0
    for trial in range(300):
        raw = (rng.random(32) * 10.0 ** rng.integers(-3, 20)).astype(np.float32)
        if trial % 2:
            raw[rng.integers(0, 32, 3)] = rng.choice(specials, 3)
        want, bad = _sanitised_reference(raw)
        with np.errstate(all="ignore"):
            p._sanitise(raw)
        counted += bad
        assert raw.tobytes() == want.tobytes(), trial
        assert p.nonfinite_scores == counted


def test_calibrate_and_adapt_given_the_logs_are_as_without() -> None:
    from agent.pipeline.calibrate import Calibrator

    def calibrator() -> Calibrator:
        c = Calibrator(threshold=None, halflife=50)
        c.learn_warm(np.exp(np.random.default_rng(12).standard_normal(200)))
        c.finish_warmup()
        return c

    a, b = calibrator(), calibrator()
    rng = np.random.default_rng(13)
    for _ in range(20):
        s = np.exp(rng.standard_normal(32) * 3)
        s[:3] = [0.0, 1e30, 1e-300]
        normal = s <= (a.threshold or 0.0) * 1.5
        logs = Calibrator.log_scores(s)
        assert a.calibrate(s).tobytes() == b.calibrate(s, logs).tobytes()
        a.adapt(s[normal])
        b.adapt(s[normal], logs[normal])
        assert (a.mu, a.var, a.n, a.threshold) == (b.mu, b.var, b.n, b.threshold)


class _LoopOnlyNumpy:
    """numpy, except that no batch looks calm to EpisodeRule's shortcut."""

    class maximum:  # stands in for the ufunc
        @staticmethod
        def reduce(a: np.ndarray) -> float:
            return np.inf

    def __getattr__(self, name: str) -> object:
        return getattr(np, name)


@pytest.mark.parametrize("seed", range(6))
def test_episode_rule_shortcut_is_the_loop(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Batches with nothing open and nothing above the threshold skip the per-window loop:
    states, events and everything the rule keeps match the loop's, across batches of
    every size, clock jumps back, onsets, cooldowns and episodes."""
    import agent.pipeline.episode as episode_module
    from agent.pipeline.episode import EpisodeRule

    rng = np.random.default_rng(seed)
    params = dict(consecutive=int(rng.integers(1, 4)), clear_windows=int(rng.integers(1, 5)),
                  clear_ratio=float(rng.choice([1.0, 0.8, 0.5])),
                  cooldown_s=float(rng.choice([0.0, 5.0])),
                  onset_windows=int(rng.choice([0, 3, 20])))
    fast, loop = EpisodeRule(**params), EpisodeRule(**params)
    n = 4000
    level = np.where((np.arange(n) // 300) % 3 == 2, 1.4, 0.6)  # stretches above 1.0
    scores = level * np.exp(rng.standard_normal(n) * 0.3)
    ts = 1000.0 + np.arange(n) * 0.1
    ts[rng.integers(0, n, 20)] -= 500.0  # the clock goes back now and then
    i = 0
    while i < n:
        k = int(rng.choice([1, 3, 32, 64, 200]))
        s, t = scores[i:i + k], ts[i:i + k]
        thr = float(rng.choice([1.0, 1.0, 1.0, 2.0]))
        got = fast.update(s, thr, t)
        with monkeypatch.context() as m:
            m.setattr(episode_module, "np", _LoopOnlyNumpy())
            want = loop.update(s, thr, t)
        assert got[0].tobytes() == want[0].tobytes() and got[1] == want[1], i
        assert fast.to_state() == loop.to_state(), i
        i += k
    assert loop.episode >= 3  # episodes opened and closed on the way


@pytest.mark.parametrize(("rows", "finite"), [
    ([[3e38, 3e38], [3e38, 1.0]], True),  # huge but finite
    ([[-3e38, -3e38], [-3e38, 1.0]], True),
    ([[3e38, -3e38], [1.0, 1.0]], True),
    ([[3e38, 3e38], [np.nan, 1.0]], False),
    ([[np.inf, -np.inf], [1.0, 1.0]], False),
    ([[1.0, 1.0], [1.0, -np.inf]], False),
])
def test_f32_frame_finiteness_check(rows: list[list[float]], finite: bool) -> None:
    from agent.decode import F32_HEADER, DecodeError, decode

    body = F32_HEADER.pack(1, 0, 2, 1.7e9, 0.5) + np.asarray(rows, "<f4").tobytes()
    if finite:
        _, cols = decode(body, "f32", ["a", "b"], 1.7e9)
        np.testing.assert_array_equal(cols.T, np.asarray(rows, np.float32))
    else:
        with pytest.raises(DecodeError) as e:
            decode(body, "f32", ["a", "b"], 1.7e9)
        assert e.value.kind == "non_finite"


def _restored_run(tmp_path: Path) -> list[np.ndarray]:
    """Half a recording, a checkpoint, the other half on a restored pipeline: its batches'
    end indices and scores."""
    from agent.pipeline import ScoreBatch
    from agent.scoring.registry import open_stream_model

    from .frames_recording import T0, recording

    cfg = _config(tmp_path)
    s = cfg.streams[0]

    def pipeline() -> stream_module.StreamPipeline:
        card, scorer = open_stream_model(cfg, s)
        return stream_module.StreamPipeline(s, card, scorer, clock=lambda: T0)

    x = recording(4000)
    first = pipeline()
    first.push(T0 + np.arange(2000) * 0.25, x[:2000])
    second = pipeline()
    second.load_state(first.to_state())
    out = []
    for i in range(2000, 4000, 300):
        for e in second.push(T0 + np.arange(i, i + 300)[:4000 - i] * 0.25, x[i:i + 300]):
            if isinstance(e, ScoreBatch):
                out += [e.end_index, e.raw, e.smoothed]
    return out


def test_a_restored_stream_numbers_its_windows_on(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    many = _restored_run(tmp_path / "many")
    assert many[0][0] == 2000 + 16  # the first full window after the checkpoint
    monkeypatch.setattr(stream_module, "READ_WINDOWS", 1)
    one = _restored_run(tmp_path / "one")
    assert np.concatenate(many[0::3]).tolist() == np.concatenate(one[0::3]).tolist()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(many, one, strict=True))


def test_feedback_keeps_the_scored_windows_of_a_read_even_when_a_batch_fails(
        tmp_path: Path) -> None:
    """The feedback head takes a read's scored windows at its end: all of them, scaled as
    scored, and only those scored when a later batch of the read raises."""
    from agent.scoring.registry import open_stream_model

    from .frames_recording import T0, recording

    cfg = _config(tmp_path)
    card, scorer = open_stream_model(cfg, cfg.streams[0])
    p = stream_module.StreamPipeline(cfg.streams[0], card, scorer, clock=lambda: T0)
    x = recording(3000)
    p.push(T0 + np.arange(1000) * 0.25, x[:1000])  # past the warm-up
    fb = p.feedback
    assert fb is not None
    held, seen = fb._held, []
    real = scorer.score

    def score(w: np.ndarray) -> np.ndarray:
        seen.append(w.copy())  # scaled, as scored
        if len(seen) == 2:
            raise RuntimeError("the model failed")
        return real(w)

    scorer.score = score  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        p.push(T0 + np.arange(1000, 1256) * 0.25, x[1000:1256])  # 64 windows: 2 batches
    assert fb._held == held + 32
    kept = fb._recent[-1][1]
    assert kept.tobytes() == seen[0].tobytes()
