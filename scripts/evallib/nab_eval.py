"""NAB evaluation of the univariate detector + post-processing, streamed the way the pipeline does.

Every included NAB file is cut into windows of `window` samples with hop 1, fed in batches of
32 windows; the warm-up (a fixed number of samples, the same for every file) only teaches the
detector and the post-processing. Rows before the first window, and windows ending inside the
warm-up, score 0. Prints NAB swept on the score column, NAB from the deployed alerts (episode
openings at a fixed threshold), cost per sample and memory, and an ablation.

    .venv/bin/python scripts/evallib/nab_eval.py
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/ for `evallib`

from agent.pipeline.postprocess import PostProcessor
from agent.scoring.artime import ArtimeDetector
from agent.scoring.gauss import WindowedGaussianDetector
from agent.scoring.knn import KnnDetector
from evallib import nab

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nab"

# The shipped defaults (what a user runs for a `model: none` single-channel stream).
WINDOW = 8
HOP = 1
WARMUP = 150  # samples; below the shortest NAB probation here (186 rows)
BATCH = 32
THRESHOLD = 0.45  # final score; 0.45 = tail probability ~3e-5 (middle of the 0.40-0.50 plateau)
REST_WINDOWS = 120
# consecutive must be 1: the rest period zeroes the windows after a crossing.
EPISODE: dict[str, Any] = {"consecutive": 1, "clear_windows": 1, "clear_ratio": 0.8,
                           "cooldown_s": 0.0}


class EwmaZDetector:
    """Baseline: |x - EWMA mean| / EWMA std of the newest sample."""

    KEY = "ewma_z"

    def __init__(self, *, hop: int, warmup: int, seed: int = 0, alpha: float = 0.01) -> None:
        self.hop, self.alpha = hop, alpha
        self.mean = float("nan")
        self.var = 0.0
        self.started = False

    def score(self, windows: npt.NDArray[np.float32]) -> F64:
        """Raw z-scores of the newest sample of each window."""
        out = np.zeros(windows.shape[0])
        for k in range(windows.shape[0]):
            new = windows[k, :, 0] if not self.started else windows[k, -self.hop:, 0]
            self.started = True
            for x in new.astype(np.float64):
                if np.isnan(self.mean):
                    self.mean = float(x)
                d = float(x) - self.mean
                out[k] = max(out[k], abs(d) / np.sqrt(self.var + 1e-12))
                self.mean += self.alpha * d
                self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        return out


DETECTORS: dict[str, Callable[..., Any]] = {
    "wgauss": WindowedGaussianDetector, "artime": ArtimeDetector, "knn": KnnDetector,
    "ewma_z": EwmaZDetector,
}
# Hyperparameters of each candidate as measured (the best of a small grid for the learners).
PARAMS: dict[str, dict[str, Any]] = {
    "wgauss": {"history": 6400}, "artime": {"ds": 4, "rho": 0.85}, "knn": {"ds": 2, "k": 1},
    "ewma_z": {"alpha": 0.01},
}


@dataclass
class Run:
    """One detector's raw scores on every file, with the newest value of each row and its cost."""

    raw: list[F64]
    newest: list[F64]
    us_per_sample: float
    state_bytes: int


def stream_file(det: Any, values: F64, window: int = WINDOW, batch: int = BATCH
                ) -> tuple[F64, F64]:
    """Raw score per row: windows of `window` samples, hop 1, `batch` windows per call."""
    n = len(values)
    raw = np.zeros(n)
    v32 = values.astype(np.float32)
    if n < window:
        return raw, values.copy()
    wins = np.lib.stride_tricks.sliding_window_view(v32, window)[:, :, None]
    for a in range(0, len(wins), batch):
        raw[window - 1 + a: window - 1 + a + len(wins[a: a + batch])] = det.score(
            np.ascontiguousarray(wins[a: a + batch]))
    return raw, values.copy()


def run_detector(files: Sequence[nab.NabFile], key: str, params: dict[str, Any]) -> Run:
    """Stream every file through a fresh detector."""
    raws, newest = [], []
    t = 0.0
    size = 0
    for f in files:
        det = DETECTORS[key](hop=HOP, warmup=WARMUP, **params)
        t0 = time.perf_counter()
        r, v = stream_file(det, f.values)
        t += time.perf_counter() - t0
        raws.append(r)
        newest.append(v)
        if hasattr(det, "to_state"):
            size = max(size, len(pickle.dumps(det.to_state())))
    return Run(raws, newest, 1e6 * t / sum(len(f) for f in files), size)


def postprocess(run: Run, **pp: Any) -> list[F64]:
    """Final scores per file; warm-up windows and rows before the first window score 0."""
    return postprocess_timed(run, **pp)[0]


def postprocess_timed(run: Run, **pp: Any) -> tuple[list[F64], float, int]:
    """Final scores, microseconds per sample and the largest state (pickled bytes)."""
    out = []
    t = 0.0
    size = 0
    for raw, v in zip(run.raw, run.newest, strict=True):
        first = WINDOW - 1
        proc = PostProcessor(warmup_windows=max(WARMUP - first, 0), **pp)
        s = np.zeros(len(raw))
        t0 = time.perf_counter()
        for a in range(first, len(raw), BATCH):
            b = min(a + BATCH, len(raw))
            s[a:b] = proc.process(raw[a:b], v[a:b])
        t += time.perf_counter() - t0
        size = max(size, len(pickle.dumps(proc.to_state())))
        out.append(s)
    return out, 1e6 * t / sum(len(r) for r in run.raw), size


def episodes(score: F64, ts: npt.NDArray[np.int64], threshold: float, consecutive: int,
             clear_windows: int, clear_ratio: float, cooldown_s: float) -> npt.NDArray[np.bool_]:
    """Rows where an alert episode opens under the deployed rule."""
    opened = np.zeros(len(score), bool)
    above = below = 0
    active = False
    last_open = -np.inf
    for i, s in enumerate(score):
        if not active:
            above = above + 1 if s >= threshold else 0
            if above >= consecutive and ts[i] - last_open >= cooldown_s:
                active, below, last_open = True, 0, float(ts[i])
                opened[i] = True
        else:
            below = below + 1 if s < clear_ratio * threshold else 0
            if below >= clear_windows:
                active, above = False, 0
    return opened


def evaluate(files: Sequence[nab.NabFile], scores: Sequence[F64]) -> dict[str, Any]:
    """Swept and deployed NAB scores of one configuration's final scores."""
    sw = nab.sweep(files, scores)
    alerts = [episodes(s, f.ts, THRESHOLD, **EPISODE) for f, s in zip(files, scores, strict=True)]
    dep = nab.score_detections(files, alerts)
    return {"swept": {k: v.score for k, v in sw.items()},
            "thr": sw["standard"].threshold, "deployed": dep,
            "alerts": int(sum(a.sum() for a in alerts))}


def _fmt(res: dict[str, Any]) -> str:
    s, d = res["swept"], res["deployed"]
    return (" / ".join(f"{s[p]:5.1f}" for p in nab.PROFILES) + f"  (thr {res['thr']:.3f})  |  "
            + " / ".join(f"{d[p]:5.1f}" for p in nab.PROFILES) + f"  ({res['alerts']} alerts)")


FULL: dict[str, Any] = {"likelihood": True, "rest_windows": REST_WINDOWS, "range_rule": True,
                        "trigger": THRESHOLD, "range_frac": 0.1}
ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("learner alone", {"likelihood": False, "rest_windows": 0, "range_rule": False}),
    ("+ likelihood", {"likelihood": True, "rest_windows": 0, "range_rule": False}),
    ("+ rest period", {"likelihood": True, "rest_windows": REST_WINDOWS, "range_rule": False,
                       "trigger": THRESHOLD}),
    ("+ range rule", FULL),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--detectors", default="wgauss,artime,knn,ewma_z")
    args = ap.parse_args(argv)
    files = nab.load_corpus(args.data)
    print(f"{len(files)} files, {sum(len(f.windows) for f in files)} windows; window {WINDOW}, "
          f"hop {HOP}, warm-up {WARMUP}, batch {BATCH}, threshold {THRESHOLD}, rest "
          f"{REST_WINDOWS}, episode {EPISODE}")
    print("columns: swept std / lowFP / lowFN (thr)  |  deployed std / lowFP / lowFN")
    for key in args.detectors.split(","):
        run = run_detector(files, key, PARAMS[key])
        final, pp_us, pp_bytes = postprocess_timed(run, **FULL)
        print(f"\n## {key} {PARAMS[key]}: detector {run.us_per_sample:.1f} us/sample, state "
              f"{run.state_bytes} B max; post-processing {pp_us:.1f} us/sample, state "
              f"{pp_bytes} B")
        for name, pp in ABLATION:
            print(f"  {name:15s} {_fmt(evaluate(files, postprocess(run, **pp)))}")
        dep = []
        for thr in (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7):
            # The rest period's trigger moves with the alert threshold, as deployed.
            fin = final if thr == THRESHOLD else postprocess(run, **{**FULL, "trigger": thr})
            al = [episodes(s, f.ts, thr, **EPISODE) for f, s in zip(files, fin, strict=True)]
            dep.append(f"{thr}: {nab.score_detections(files, al)['standard']:.1f}")
        print("  deployed standard by threshold (full config): " + ", ".join(dep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
