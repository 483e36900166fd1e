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
