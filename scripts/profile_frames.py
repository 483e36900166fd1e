"""f32 frames through one stream's pipeline, in process: samples/s and µs per window by stage.

    .venv/bin/python scripts/profile_frames.py [--model default|none] [--frames 400] [--batch N]
    PYTHONPATH=<other checkout> .venv/bin/python scripts/profile_frames.py   # before/after
    .venv/bin/python scripts/profile_frames.py --against <other checkout> --rounds 5

``--against`` runs the unwrapped figure of this checkout and of the other one in turn,
``--rounds`` times each (one process per run, the other's through ``PYTHONPATH``), and
prints every round and each side's best: on a shared machine a before/after is read
from rounds taken together, not from one run.

What the ingest thread does with an f32 frame, minus MQTT: ``agent.decode.decode``,
``StreamPipeline.append``, and ``process`` as soon as a full batch is ready. The
stream is the bench's (``scripts/bench.py``: 8 fields, window 16, hop 4, the
default settings; ``--model none`` for PCA T²+Q, the shipped pump stream's
detector), frames of 256 samples past the warm-up. The first figure is the
unwrapped path (best of ``--repeat``); the table comes from a second pass that
times each stage through a wrapper, so its rows add up to a little more. Only
public methods and attributes both checkouts have are wrapped.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import agent
import agent.pipeline.stream as stream_module
from agent.config import parse_config
from agent.decode import decode
from agent.pipeline import StreamPipeline
from agent.scoring.registry import open_stream_model

FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS"]
ROW = np.array([0.21, 0.27, 2.4, 0.11, 89.5, 28.4, 228.6, 125.1])
T0 = 1_700_000_000.0
FRAME = 256


def pipeline(model: str, **overrides: Any) -> StreamPipeline:
    """The bench's stream (``overrides``: other stream settings) in a throw-away state dir."""
    s: dict[str, Any] = {"name": "pump", "topic": "t", "fields": FIELDS, "format": "f32",
                         **overrides}
    if model != "default":
        s["model"] = model
    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-frames-"))
    cfg = parse_config({"device_id": "d", "state_dir": str(tmp),
                        "local": {"host": "127.0.0.1", "port": 1},
                        "upstream": {"host": "127.0.0.1", "port": 1}, "streams": [s]},
                       base_dir=Path(agent.__file__).resolve().parent.parent)
    card, scorer = open_stream_model(cfg, cfg.streams[0])
    return StreamPipeline(cfg.streams[0], card, scorer)


def frames(n: int) -> list[bytes]:
    rng = np.random.default_rng(2)
    rows = (ROW * (1 + 0.01 * rng.standard_normal((FRAME * 64, len(ROW))))).astype("<f4")
    return [struct.pack("<BBHdf", 1, 0, len(FIELDS), T0 + i * FRAME * 1e-3, 1e-3)
            + rows[(i % 64) * FRAME:(i % 64 + 1) * FRAME].tobytes() for i in range(n)]


def feed(p: StreamPipeline, bodies: list[bytes]) -> None:
    """The ingest thread's work per frame: decode, ring, score full batches at once."""
    now = T0 + 1e6
    for b in bodies:
        ts, values = decode(b, "f32", FIELDS, now)
        if p.append(ts, np.asarray(values).T) >= p.cfg.batch:
            p.process()
    p.process()


def wrap(spent: dict[str, float], obj: Any, attr: str, label: str) -> None:
    """Replace ``obj.attr`` by a timing wrapper (nested stages count in both rows)."""
    fn = getattr(obj, attr, None)
    if fn is None:
        return

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

    setattr(obj, attr, timed)


def stages(p: StreamPipeline, bodies: list[bytes]) -> dict[str, float]:
    spent: dict[str, float] = {}
    stages_of: list[tuple[Any, str, str]] = [
        (p, "process", "process (everything below)"), (p, "_score", "  score a batch (below)"),
        (p.ring, "read", "  ring read"), (p.summary, "add_samples", "  summary: samples"),
        (p.summary, "add_scores", "  summary: scores"),
        (p.scaling, "apply", "    scaling.apply"), (p.slot.scorer, "score", "    scorer.score"),
        (p.slot.scorer, "learn", "    scorer.learn"),
        (p.slot.scorer, "learn_masked", "    scorer.learn"),
        (p, "_sanitise", "    sanitise"), (stream_module, "window_summaries",
                                           "    feedback: window summaries"),
        (p.calibrator, "smooth", "    calibrator.smooth"),
        (p.calibrator, "calibrate", "    calibrator.calibrate"),
        (p.episodes, "update", "    episodes.update"),
        (p.calibrator, "adapt", "    calibrator.adapt"),
        (p.scaling, "track", "    scaling.track"),
        (p.scaling, "track_columns", "    scaling.track"),
        (p.scaling, "offsets", "    scaling.offsets (per read)"),
        (p.feedback, "remember", "    feedback.remember"),
    ]
    for obj, attr, label in stages_of:
        wrap(spent, obj, attr, label)
    feed(p, bodies)
    return {label: spent.get(label, 0.0) for _, _, label in stages_of}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="default (the bench's) or none (pca)")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None,
                    help="the stream's batch (default: the schema's)")
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout: alternate runs of both, --rounds each")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.against is not None:
        compare(args)
        return
    p = pipeline(args.model, **({} if args.batch is None else {"batch": args.batch}))
    feed(p, frames(40))  # past the warm-up
    bodies = frames(args.frames)
    best = min(_timed(lambda: feed(p, bodies)) for _ in range(args.repeat))
    windows = args.frames * FRAME // p.cfg.hop
    print(f"agent: {Path(agent.__file__).resolve().parent}")
    print(f"stream: {type(p.slot.scorer).__name__}, window {p.cfg.window}, hop {p.cfg.hop}, "
          f"batch {p.cfg.batch}; {args.frames} f32 frames of {FRAME} samples, best of "
          f"{args.repeat}")
    print(f"  decode + append + process: {args.frames * FRAME / best:12,.0f} samples/s "
          f"({best / windows * 1e6:.2f} µs per window)")
    spent = stages(p, bodies)
    print("  µs per window by stage (wrapped pass):")
    for label, s in spent.items():
        if s:
            print(f"    {label:34s} {s / windows * 1e6:6.2f}")


def compare(args: argparse.Namespace) -> None:
    """This checkout and ``args.against`` in turn, ``args.rounds`` runs each."""
    import os  # noqa: PLC0415
    import re  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    other = args.against.resolve()
    cmd = [sys.executable, __file__, "--model", args.model, "--frames", str(args.frames),
           "--repeat", str(args.repeat),
           *(() if args.batch is None else ("--batch", str(args.batch)))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    here = Path(__file__).resolve().parent.parent
    sides = {"this checkout": env, f"{other}": {**env, "PYTHONPATH": str(other)}}
    roots = {"this checkout": here, f"{other}": other}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    print(f"stream model {args.model}: samples/s of {args.frames} f32 frames (best of "
          f"{args.repeat} passes per run), {args.rounds} rounds, the two in turn")
    for r in range(args.rounds):
        row = []
        for side, side_env in sides.items():
            out = subprocess.run(cmd, env=side_env, capture_output=True, text=True,
                                 check=True).stdout
            m = re.search(r"decode \+ append \+ process:\s+([\d,]+) samples/s", out)
            if m is None or f"agent: {roots[side] / 'agent'}" not in out:  # the right one
                raise SystemExit(f"unexpected output of {side}:\n{out}")
            rates[side].append(float(m.group(1).replace(",", "")))
            row.append(f"{side}: {rates[side][-1]:12,.0f}")
        print(f"  round {r + 1}: " + "   ".join(row))
    (a, ra), (b, rb) = rates.items()
    print(f"  best: {a} {max(ra):,.0f}, {b} {max(rb):,.0f}: {max(ra) / max(rb):.2f}x")
    pairs = sorted(x / y for x, y in zip(ra, rb, strict=True))
    print(f"  ratio per round (this / other): median {pairs[len(pairs) // 2]:.2f}, "
          f"range {pairs[0]:.2f}-{pairs[-1]:.2f}")


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
