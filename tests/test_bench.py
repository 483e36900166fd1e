"""The benchmark runs end to end: ``scripts/bench.py --quick`` completes and prints every
section. It checks no figure's value (benchmarks print figures, tests keep correctness)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

SECTIONS = [
    "== setup",
    "== start-up and idle memory",
    "== reference: bare paho receive + json.loads",
    "== sustained ingest",
    "== framed ingest",
    "== sensor -> alert latency",
    "== 1,000 alert messages/s",
    "== many streams",
    "== per-stage cost",
    "== summary",
]


@pytest.mark.slow
def test_bench_quick_prints_every_section() -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    missing = [s for s in SECTIONS if s not in out.stdout]
    assert not missing, f"sections missing: {missing}\n{out.stdout[-3000:]}"
    for line in ("f32 frames of", "relay floor:", "agent sustained:", "reference sustained:",
                 "commit: one alert", "bench: done"):
        assert line in out.stdout, line
