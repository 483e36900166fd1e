"""Replay speed: rows per second through `agent.replay.replay` on SKAB valve1.

    .venv/bin/python scripts/bench_replay.py [--data ../shared/data] [--repeat 3]

Replays every valve1 file with the shipped example stream (the pump), best of
``--repeat`` runs, and prints rows/s. Reads the evaluation data when present;
exits 0 with a message otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from agent.config import parse_config
from agent.replay import CsvLayout, replay

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", help="score the pump stream with this model instead of the "
                    "example's setting (e.g. skab-ae, to compare with an older checkout)")
    args = ap.parse_args()
    files = sorted((args.data / "skab" / "valve1").glob("*.csv"))
    if not files:
        print(f"no SKAB data under {args.data}; nothing to measure")
        return 0
    raw = yaml.safe_load((REPO / "config" / "agent.example.yaml").read_text())
    raw["state_dir"] = "/tmp/edge-agent-bench-replay"
    raw["streams"] = [s for s in raw["streams"] if s["name"] == "pump"]
    if args.model:
        raw["streams"][0]["model"] = args.model
        raw["streams"][0].pop("transforms", None)
    cfg = parse_config(raw, base_dir=REPO / "config")
    layout = CsvLayout(delimiter=";", time_column="datetime")
    best = float("inf")
    rows = 0
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        rows = sum(replay(cfg, f, None, layout=layout).rows for f in files)
        best = min(best, time.perf_counter() - t0)
    print(f"replay (pump stream, model {cfg.streams[0].model}): {len(files)} files, {rows} "
          f"rows, best of {args.repeat}: {best:.3f} s, "
          f"{rows / best:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
