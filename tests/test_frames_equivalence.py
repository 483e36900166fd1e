"""The f32 frame path gives what it gave before it was made fast (issue 13, perf-f32).

The golden file holds the outputs of the commit before the change on a fixed
SKAB-like recording (tests/frames_recording.py): a shipped model and PCA T²+Q,
frames of 256 and of odd sizes against odd batch sizes, partial batches scored
by the inference thread, a feedback label half-way, summaries. Scores may differ
only by float rounding; which windows alert, and when, may not differ at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .frames_recording import CASES, GOLDEN, run_case

EXACT = ("end_ts", "end_index", "episode", "warm", "batch_sizes")


@pytest.mark.parametrize("name", list(CASES))
def test_frame_path_matches_the_recorded_outputs(tmp_path: Path, name: str) -> None:
    golden = np.load(GOLDEN)
    got = run_case(name, tmp_path)
    assert sorted(got) == sorted(k.split("/", 1)[1] for k in golden.files if
                                 k.startswith(f"{name}/"))
    for key, value in got.items():
        want = golden[f"{name}/{key}"]
        assert value.shape == want.shape, key
        if key in EXACT:
            np.testing.assert_array_equal(value, want, err_msg=key)
        else:
            np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-9, err_msg=key)


def test_the_recording_alerts_so_the_comparison_has_teeth(tmp_path: Path) -> None:
    """Episodes and a feedback-adjusted stretch are in the golden outputs: a path that
    dropped windows, reordered them or ignored labels could not match them."""
    golden = np.load(GOLDEN)
    for name in CASES:
        assert golden[f"{name}/episodes"].shape[0] >= 2, name
        assert golden[f"{name}/summaries"].size > 0, name


def test_summary_moments_merged_in_blocks_are_those_of_all_values() -> None:
    """Summaries hold blocks back and merge them together: count, mean, std, min and max
    of a period longer than the hold-back and the reservoir are those of every value,
    and p95 (estimated from the reservoir past RESERVOIR_SIZE values) stays near it."""
    from agent.pipeline.aggregate import PENDING_ROWS, RESERVOIR_SIZE, SummaryAggregator

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3 * PENDING_ROWS + 77, 2)) * [1.0, 50.0] + [0.0, 1e3]
    agg = SummaryAggregator(["a", "b"], 60.0)
    i = 0
    for size in [1, 255, 64, 4096, 5000, 3] * 3:
        agg.add_samples(x[i:i + size].astype(np.float32), 0.0)
        i += size
    agg.add_samples(x[i:].astype(np.float32), 0.0)
    body = agg.flush()
    assert body is not None and body["count"] == x.shape[0] > RESERVOIR_SIZE
    v = x.astype(np.float32).astype(np.float64)
    for j, name in enumerate(["a", "b"]):
        got = body["fields"][name]
        assert got["mean"] == pytest.approx(v[:, j].mean(), rel=1e-5, abs=1e-6)
        assert got["std"] == pytest.approx(v[:, j].std(ddof=1), rel=1e-5)
        assert got["min"] == pytest.approx(v[:, j].min(), rel=1e-5)  # 6 significant digits
        assert got["max"] == pytest.approx(v[:, j].max(), rel=1e-5)
        assert got["p95"] == pytest.approx(np.quantile(v[:, j], 0.95), rel=0.05)
    assert agg.flush() is None  # the period is over: nothing pending is left behind


@pytest.mark.parametrize("window", [16, 256])
def test_a_label_summarises_the_window_it_names(window: int) -> None:
    """Small windows are kept whole and summarised when labelled, large ones summarised at
    once; either way the prototype is that window's summary, and only the last
    FEEDBACK_HISTORY windows can be named."""
    from agent.pipeline.feedback import FEEDBACK_HISTORY, FeedbackHead, window_summaries

    rng = np.random.default_rng(4)
    fb = FeedbackHead()
    batches = [rng.standard_normal((32, window, 8)).astype(np.float32) for _ in range(20)]
    for k, w in enumerate(batches):
        fb.remember(1000.0 + 32 * k + np.arange(32.0), w)
    newest = 1000.0 + 32 * 20 - 1
    assert not fb.label(newest - FEEDBACK_HISTORY - 5, "normal")  # forgotten
    assert fb.label(newest - 40.2, "anomaly")  # window 40 back from the newest
    want = window_summaries(batches[-2][-9:-8])[0]  # the 41st newest of 640
    np.testing.assert_allclose(fb.prototypes[-1][0], want, rtol=1e-12)
    assert fb.prototypes[-1][1] and fb.labels == {"normal": 0, "anomaly": 1}
