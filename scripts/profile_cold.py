"""What one window costs to score when readings come one at a time, hot and cold.

    .venv/bin/python scripts/profile_cold.py [--messages 8000] [--gap-ms 1] [--batch N]

The stream is the latency benchmark's (``scripts/bench.py``, section latency: the
shipped model, window 16, hop 4, an anomalous segment of 20 readings in every
120, so episodes open and close). Each single-reading message is appended the way
the ingest thread does it and, when a window is ready, ``process()`` scores it;
the figure is the wall time of that append and ``process()``, per kind of window
(normal, one that opens an episode, one that closes it). Three passes:

* back to back: the next message at once (the caches hold the scoring path);
* sleep: ``--gap-ms`` asleep between messages, as at 1,000 msg/s;
* spin: the same gap, busy in a loop instead (the core stays awake).

The benchmark's agent sees the second case: one reading per millisecond.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.pipeline import StreamPipeline
from agent.pipeline.events import Episode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the benchmark's own payloads
import profile_frames  # its stream, in a throw-away state dir


def pipeline(**overrides: Any) -> StreamPipeline:
    """The latency section's stream (``bench.latency_config``): the bench's, episodes that
    open and close at once (``overrides``: other stream settings)."""
    return profile_frames.pipeline("default", format="json", alert=bench.LATENCY_ALERT,
                                   **overrides)


def run(messages: int, gap_s: float, mode: str, **overrides: Any) -> dict[str, list[float]]:
    p = pipeline(**overrides)
    rows = bench.normal_rows(512, seed=3, noise=0.3)
    anomaly = np.asarray(bench.ANOMALY, np.float64)
    t0 = 1.7e9
    spent: dict[str, list[float]] = {"normal": [], "alert": [], "resolved": []}
    for i in range(messages):
        if mode == "sleep":
            time.sleep(gap_s)
        elif mode == "spin":
            end = time.perf_counter() + gap_s
            while time.perf_counter() < end:
                pass
        far = i >= 600 and (i - 600) % 120 >= 100
        values = anomaly if far else np.asarray(rows[i % 512], np.float64)
        t = time.perf_counter()
        if p.append(t0 + i * 1e-3, values):
            events = p.process()
            took = (time.perf_counter() - t) * 1e6
            kinds = [e.kind for e in events if isinstance(e, Episode)]
            if i >= 600:  # past the warm-up
                spent[kinds[0] if kinds else "normal"].append(took)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=8000)
    ap.add_argument("--gap-ms", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=None,
                    help="the stream's batch (default: the schema's)")
    args = ap.parse_args()
    overrides = {} if args.batch is None else {"batch": args.batch}
    print(f"µs to append a reading and score the window it completes, {args.messages} "
          f"messages; p50 / p90 / p99")
    for mode in ("back to back", "sleep", "spin"):
        spent = run(args.messages, args.gap_ms / 1000.0, mode, **overrides)
        label = mode if mode == "back to back" else f"{mode} {args.gap_ms:g} ms"
        cells = []
        for kind, xs in spent.items():
            if xs:
                q = np.percentile(xs, [50, 90, 99])
                cells.append(f"{kind} ({len(xs)}) {q[0]:.0f} / {q[1]:.0f} / {q[2]:.0f}")
        print(f"  {label:14s} " + "; ".join(cells))


if __name__ == "__main__":
    main()
