"""Replay groups windows as the live agent does: by when their samples came, not by count.

Live, a window that comes `max_delay_ms` or more after the previous ones is scored alone
(agent/ingest.py); replay must do the same, or a 1 Hz recording is scored in batches of
`batch` windows that the device never forms, and what is learnt from one window reaches
the next one only a batch later.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from agent.config import parse_config
from agent.replay import CsvLayout, _pushes, replay

from .conftest import REPO, SKAB_FIELDS, agent_config
from .frames_recording import LEVEL


def _stream(**kw: Any) -> Any:
    s = {"window": 16, "hop": 4, "batch": 128, "buffer": 4096, "max_delay_ms": 1.0, **kw}
    return SimpleNamespace(**s)


def test_one_hz_windows_are_pushed_one_at_a_time_then_the_tail():
    ts = 1.6e9 + np.arange(50, dtype=np.float64)  # windows end at samples 15, 19, ... 47
    assert _pushes(ts, _stream()) == [16, 20, 24, 28, 32, 36, 40, 44, 48, 50]


def test_windows_that_come_within_max_delay_share_a_push():
    # Samples 0.1 ms apart: windows 0.4 ms apart, so three fit in 1 ms after a group's first.
    ts = np.arange(40, dtype=np.float64) * 1e-4
    assert _pushes(ts, _stream()) == [24, 36, 40]
    # max_delay_ms 0: every window alone (live: scored at once).
    assert _pushes(ts, _stream(max_delay_ms=0.0)) == [16, 20, 24, 28, 32, 36, 40]


def test_a_burst_is_grouped_up_to_batch_and_never_overruns_the_ring():
    ts = np.zeros(16 + 4 * 99, np.float64)  # one timestamp: 100 windows at once
    assert _pushes(ts, _stream(batch=32)) == [16 + 4 * 31, 16 + 4 * 63, 16 + 4 * 95, 412]
    # A ring of 64 samples holds (64 - 16) / 4 = 12 windows' new samples.
    assert _pushes(ts, _stream(batch=32, buffer=64))[:2] == [16 + 4 * 11, 16 + 4 * 23]
    assert _pushes(np.zeros(0), _stream()) == []
    assert _pushes(np.zeros(10), _stream()) == [10]  # no whole window: one push


def _recording(path: Path) -> None:
    """A 1 Hz pump whose level moves halfway: what the detector learns matters."""
    rng = np.random.default_rng(3)
    n = 1200
    vals = LEVEL * (1 + 0.01 * rng.standard_normal((n, 8)))
    vals[n // 2:, 2] *= 1.05  # the current steps up
    vals[900:940, 7] *= 0.6  # a flow drop
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", *SKAB_FIELDS])
        for i, v in enumerate(vals):
            w.writerow([f"{1.6e9 + i:.0f}", *(f"{x:.6g}" for x in v)])


def test_a_one_hz_replay_does_not_depend_on_batch(tmp_path):
    src = tmp_path / "rec.csv"
    _recording(src)
    raw: dict[int, np.ndarray] = {}
    states: dict[int, np.ndarray] = {}
    for batch in (1, 128):
        cfg = parse_config(agent_config(tmp_path, 1883, model="none", warmup=300, batch=batch),
                           base_dir=REPO)
        out = tmp_path / f"out{batch}.csv"
        r = replay(cfg, src, out, layout=CsvLayout())
        raw[batch] = np.array([float(row["raw_score"] or "nan")
                               for row in csv.DictReader(out.open())])
        states[batch] = r.state
    assert np.count_nonzero(np.isfinite(raw[1])) > 250  # a raw score at every window end
    assert states[1][900:960].any()  # the flow drop is seen
    np.testing.assert_array_equal(raw[1], raw[128])
    np.testing.assert_array_equal(states[1], states[128])
