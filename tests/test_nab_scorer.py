"""Known-answer test for the NAB scorer: published result files must score as published."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nab"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from evallib import nab  # noqa: E402

EXPECTED = {
    "numenta": (72.30, 69.12, 75.98),
    "windowedGaussian": (26.52, 2.24, 37.12),
}


@pytest.fixture(scope="module")
def corpus() -> list[nab.NabFile]:
    if not (DATA / "combined_windows.json").is_file():
        pytest.skip(f"../shared/data/nab not present: {DATA}")
    return nab.load_corpus(DATA)


@pytest.mark.parametrize("detector", sorted(EXPECTED))
def test_published_results_score_as_published(corpus: list[nab.NabFile], detector: str) -> None:
    scores = nab.load_result_scores(DATA / "results" / detector, corpus)
    got = nab.sweep(corpus, scores)
    want = dict(zip(nab.PROFILES, EXPECTED[detector], strict=True))
    for pname, sw in got.items():
        assert round(sw.score, 2) == pytest.approx(want[pname], abs=1e-9), pname
        # Flags at the chosen threshold score the same through the fixed-detection path.
        flags = [s >= sw.threshold for s in scores]
        assert nab.score_detections(corpus, flags)[pname] == pytest.approx(sw.score, abs=1e-9)


def test_null_and_perfect(corpus: list[nab.NabFile]) -> None:
    null = [np.zeros(len(f), bool) for f in corpus]
    perfect = [np.zeros(len(f), bool) for f in corpus]
    for f, d in zip(corpus, perfect, strict=True):
        for s, _ in f.windows:
            d[s] = True
    for pname in nab.PROFILES:
        assert nab.score_detections(corpus, null)[pname] == pytest.approx(0.0)
        assert nab.score_detections(corpus, perfect)[pname] == pytest.approx(100.0)
