"""A fixed recording driven through the f32 frame path, and what the pipeline made of it.

``tests/test_frames_equivalence.py`` compares the pipeline of this checkout with
``tests/data/frames_golden.npz``, which this module wrote on the commit before the
frame path was made faster (perf-f32): the fast path must give the same scores,
episodes, thresholds, summaries and feedback. Regenerate it only when a change of
results is intended::

    .venv/bin/python -m tests.frames_recording
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import parse_config
from agent.decode import decode
from agent.pipeline import Episode, ScoreBatch, StreamPipeline
from agent.scoring.registry import open_stream_model

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "frames_golden.npz"
FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS"]
# SKAB valve1's operating point and a spread per field, roughly.
LEVEL = np.array([0.21, 0.27, 2.4, 0.11, 89.5, 28.4, 228.6, 125.1])
SPREAD = np.array([0.005, 0.006, 0.3, 0.05, 0.4, 0.3, 1.0, 2.0])
T0 = 1_700_000_000.0
PERIOD = 0.25
# name -> (stream settings, frame sizes cycled through, label one window at this frame);
# batch 32 (the default when the golden file was recorded) is named: outputs depend on it.
CASES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "model": ({"batch": 32}, (256,)),
    "model_odd_frames": ({"batch": 7}, (100, 3, 257)),
    "pca": ({"model": "none", "batch": 32}, (256,)),
    "pca_odd_frames": ({"model": "none", "batch": 20, "window": 12, "hop": 3}, (61, 256, 5)),
}
LABEL_AT = 60  # frame after which an operator labels a recent window as a false alarm


def recording(n: int, seed: int = 0) -> np.ndarray:
    """(n, 8) SKAB-like samples: noise around an operating point, a slow drift of the
    temperatures, a valve fault (a step in pressure and flow) and a short spike."""
    rng = np.random.default_rng(seed)
    x = LEVEL + SPREAD * rng.standard_normal((n, len(LEVEL)))
    x[:, 4] += np.linspace(0.0, 3.0, n)
    x[:, 5] += np.linspace(0.0, 2.0, n)
    a, b = n // 2, n // 2 + 1000
    x[a:b, 3] += 0.4
    x[a:b, 7] -= 15.0
    x[n * 3 // 4:n * 3 // 4 + 40, 0] *= 3.0
    return x.astype(np.float32)


def _frame(t0: float, rows: np.ndarray) -> bytes:
    return struct.pack("<BBHdf", 1, 0, rows.shape[1], t0, PERIOD) + rows.astype("<f4").tobytes()


def run_case(name: str, tmp: Path) -> dict[str, np.ndarray]:
    """Drive one case like the ingest thread does; every output the pipeline produced."""
    over, sizes = CASES[name]
    stream = {"name": "pump", "topic": "t", "format": "f32", "fields": FIELDS, **over}
    cfg = parse_config({"device_id": "d", "state_dir": str(tmp / name),
                        "local": {"host": "127.0.0.1", "port": 1},
                        "upstream": {"host": "127.0.0.1", "port": 1},
                        "streams": [stream]}, base_dir=REPO)
    s = cfg.streams[0]
    card, scorer = open_stream_model(cfg, s)
    clock = [T0]
    p = StreamPipeline(s, card, scorer, clock=lambda: clock[0])
    x = recording(12_000)
    events: list[Any] = []
    summaries: list[float] = []
    i = k = 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        rows = x[i:i + n]
        ts, values = decode(_frame(T0 + i * PERIOD, rows), "f32", FIELDS, T0 + 1e6)
        clock[0] = T0 + (i + len(rows)) * PERIOD
        if p.append(ts, np.asarray(values).T) >= s.batch:
            events += p.process()
        if k % 5 == 4:  # the inference thread's turn: whatever is ready
            events += p.process()
        summary = p.flush_summary()
        if summary is not None:
            summaries += _summary_row(summary.body)
        if k == LABEL_AT:
            last = next(e for e in reversed(events) if isinstance(e, ScoreBatch))
            assert p.label(float(last.end_ts[-1]) - 3.0, "normal")
        i += len(rows)
        k += 1
    events += p.process()
    return _arrays(events, summaries)


def _summary_row(body: dict[str, Any]) -> list[float]:
    out = [float(body["count"]), float(body["windows"]), float(body["alerts"])]
    for f in FIELDS:
        out += [float(body["fields"][f][k]) for k in ("mean", "std", "min", "max", "p95")]
    return out


def _arrays(events: list[Any], summaries: list[float]) -> dict[str, np.ndarray]:
    batches = [e for e in events if isinstance(e, ScoreBatch)]
    episodes = [e for e in events if isinstance(e, Episode)]
    cat = np.concatenate
    return {
        "end_ts": cat([b.end_ts for b in batches]),
        "end_index": cat([b.end_index for b in batches]),
        "raw": cat([b.raw for b in batches]).astype(np.float64),
        "smoothed": cat([b.smoothed for b in batches]).astype(np.float64),
        "anomaly": cat([b.anomaly for b in batches]).astype(np.float64),
        "episode": cat([b.episode for b in batches]),
        "warm": cat([np.full(len(b.raw), b.warm) for b in batches]),
        "threshold": np.array([np.nan if b.threshold is None else b.threshold
                               for b in batches]),
        "batch_sizes": np.array([len(b.raw) for b in batches]),
        "episodes": np.array([[e.episode, e.ts, e.started, e.score, e.threshold,
                               0.0 if e.kind == "alert" else 1.0] for e in episodes]
                             ).reshape(-1, 6),
        "summaries": np.array(summaries),
    }


def main() -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="frames-golden-"))
    out = {f"{name}/{k}": v for name in CASES for k, v in run_case(name, tmp).items()}
    np.savez_compressed(GOLDEN, **out)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
