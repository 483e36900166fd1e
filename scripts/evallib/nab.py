"""NAB scoring (Lavin & Ahmad 2015, and the sweeper in NAB's own code), vectorised in numpy."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
BOOL = npt.NDArray[np.bool_]

# (A_TP, A_FP, A_FN) per application profile (Lavin & Ahmad, table 1; NAB config/profiles.json).
PROFILES: dict[str, tuple[float, float, float]] = {
    "standard": (1.0, 0.11, 1.0),
    "reward_low_FP_rate": (1.0, 0.22, 1.0),
    "reward_low_FN_rate": (1.0, 0.11, 2.0),
}
PROFILE_SHORT = {"standard": "std", "reward_low_FP_rate": "lowFP", "reward_low_FN_rate": "lowFN"}
INCLUDED = ("artificialNoAnomaly", "artificialWithAnomaly", "realAWSCloudwatch")


def scaled_sigmoid(x: F64) -> F64:
    """NAB's scaled sigmoid: ~1 at a window's start, 0 at its end, -1 well after it."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        val = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return np.where(x > 3.0, -1.0, val)


def probation_rows(n: int) -> int:
    """Rows at the start of a file that are never scored: min(15 %, 750)."""
    return int(min(math.floor(0.15 * n), 0.15 * 5000))


@dataclass
class NabFile:
    """One corpus file: its values, timestamps and labelled windows as inclusive row ranges."""

    name: str
    ts: npt.NDArray[np.int64]
    values: F64
    windows: list[tuple[int, int]]
    probation: int = field(init=False)

    def __post_init__(self) -> None:
        self.probation = probation_rows(len(self.ts))

    def __len__(self) -> int:
        return len(self.ts)


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text.strip()).timestamp())


def _read_csv(path: Path) -> tuple[npt.NDArray[np.int64], F64, list[str]]:
    """Timestamps, values, and any further columns (as text) of a NAB-style CSV."""
    ts: list[int] = []
    vals: list[float] = []
    rest: list[str] = []
    with path.open() as fh:
        next(fh)
        for line in fh:
            if not line.strip():
                continue
            parts = line.rstrip("\n").split(",")
            ts.append(_epoch(parts[0]))
            vals.append(float(parts[1]))
            rest.append(",".join(parts[2:]))
    return np.asarray(ts, np.int64), np.asarray(vals, np.float64), rest


def load_corpus(root: Path, folders: Sequence[str] = INCLUDED) -> list[NabFile]:
    """Every labelled file under `root` (a NAB data folder) whose folder is in `folders`."""
    labels: dict[str, list[list[str]]] = json.loads((root / "combined_windows.json").read_text())
    out: list[NabFile] = []
    for name in sorted(labels):
        if name.split("/")[0] not in folders or not (root / name).is_file():
            continue
        ts, vals, _ = _read_csv(root / name)
        wins = []
        for a, b in labels[name]:
            ia = int(np.searchsorted(ts, _epoch(a), side="left"))
            ib = int(np.searchsorted(ts, _epoch(b), side="right")) - 1
            wins.append((ia, ib))
        out.append(NabFile(name, ts, vals, wins))
    return out


def load_result_scores(results_dir: Path, files: Sequence[NabFile]) -> list[F64]:
    """The anomaly_score column of a published detector's result files, one per corpus file."""
    det = results_dir.name
    out = []
    for f in files:
        folder, base = f.name.split("/")
        ts, _, rest = _read_csv(results_dir / folder / f"{det}_{base}")
        if len(ts) != len(f) or not np.array_equal(ts, f.ts):
            raise ValueError(f"{det}: rows of {f.name} do not match the data file")
        out.append(np.asarray([float(r.split(",")[0]) for r in rest], np.float64))
    return out


@dataclass
class _Rows:
    """Scored rows (after probation) of all files, with what a detection there would earn."""

    tp_reward: F64  # unweighted TP reward (scaled sigmoid / its maximum); 0 outside windows
    fp_cost: F64  # unweighted FP value (scaled sigmoid, negative); 0 inside windows
    window: npt.NDArray[np.int64]  # global window id, -1 outside windows
    file: npt.NDArray[np.int64]
    n_windows: int


def _rows(files: Sequence[NabFile]) -> _Rows:
    """Per-row rewards as NAB's sweeper computes them (calcSweepScore)."""
    max_tp = float(scaled_sigmoid(np.array([-1.0]))[0])
    tp, fp, win, fid = [], [], [], []
    wbase = 0
    for k, f in enumerate(files):
        n = len(f)
        i = np.arange(n)
        t = np.zeros(n)
        c = np.full(n, -1.0)  # before any window: the lowest score
        w = np.full(n, -1, np.int64)
        for j, (s, e) in enumerate(f.windows):
            width = e - s + 1
            inside = slice(s, e + 1)
            t[inside] = scaled_sigmoid(-(e - i[inside] + 1) / width) / max_tp
            c[inside] = 0.0
            w[inside] = wbase + j
            nxt = f.windows[j + 1][0] if j + 1 < len(f.windows) else n
            after = slice(e + 1, nxt)
            # NAB divides by (width - 1) here, not width.
            c[after] = scaled_sigmoid(np.abs(e - i[after]) / max(width - 1, 1))
        p = f.probation
        tp.append(t[p:])
        fp.append(c[p:])
        win.append(w[p:])
        fid.append(np.full(n - p, k, np.int64))
        wbase += len(f.windows)
    return _Rows(np.concatenate(tp), np.concatenate(fp), np.concatenate(win),
                 np.concatenate(fid), wbase)


def _normaliser(files: Sequence[NabFile], profile: tuple[float, float, float]
                ) -> tuple[float, float]:
    """(null, perfect) raw scores: nothing detected, and every window hit at its first row."""
    a_tp, _, a_fn = profile
    n_win = sum(len(f.windows) for f in files)
    return -a_fn * n_win, a_tp * n_win


@dataclass
class Sweep:
    """Best normalised score of one profile and the threshold that gives it."""

    score: float
    threshold: float
    raw: float


def sweep(files: Sequence[NabFile], scores: Sequence[F64],
          profiles: dict[str, tuple[float, float, float]] | None = None) -> dict[str, Sweep]:
    """NAB's threshold sweep: one threshold per profile over all files; rows >= it detect."""
    profiles = profiles or PROFILES
    r = _rows(files)
    s = np.concatenate([np.asarray(sc, np.float64)[f.probation:]
                        for f, sc in zip(files, scores, strict=True)])
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    win = r.window[order]
    inwin = win >= 0
    # The last point of each group of equal scores: the state after detecting everything >= it.
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    out: dict[str, Sweep] = {}
    for pname, (a_tp, a_fp, a_fn) in profiles.items():
        null, perfect = _normaliser(files, (a_tp, a_fp, a_fn))
        delta = np.where(inwin, 0.0, a_fp * r.fp_cost[order])
        # Per window: the running max of the reward (first detection counts), from -A_FN.
        wv = a_tp * r.tp_reward[order][inwin]
        wid = win[inwin]
        pos = np.flatnonzero(inwin)
        o2 = np.lexsort((pos, wid))  # group by window, keep sweep order inside
        wv2, wid2 = wv[o2], wid[o2]
        starts = np.r_[True, wid2[1:] != wid2[:-1]]
        run = np.empty_like(wv2)
        grp = np.cumsum(starts) - 1
        # Running max within groups: offset each group so one accumulate works.
        off = grp * 10.0
        run = np.maximum.accumulate(np.maximum(wv2, -a_fn) + off) - off
        prev = np.where(starts, -a_fn, np.r_[-a_fn, run[:-1]])
        d_w = np.empty_like(wv2)
        d_w[o2] = run - prev
        delta[pos] = d_w
        total = null + np.cumsum(delta)
        cand = np.r_[null, total[last]]
        thr = np.r_[np.inf, s_sorted[last]]
        b = int(np.argmax(cand))
        out[pname] = Sweep(100.0 * (cand[b] - null) / (perfect - null), float(thr[b]),
                           float(cand[b]))
    return out


def score_detections(files: Sequence[NabFile], detections: Sequence[BOOL],
                     profiles: dict[str, tuple[float, float, float]] | None = None
                     ) -> dict[str, float]:
    """Normalised NAB score of fixed per-row detection flags (e.g. a deployed rule's alerts)."""
    scores = [np.asarray(d, bool).astype(np.float64) for d in detections]
    profiles = profiles or PROFILES
    out = {}
    for pname, prof in profiles.items():
        # Detections are exactly the rows flagged: the threshold-1 point of the sweep.
        r = _raw_at(files, scores, prof, 1.0)
        null, perfect = _normaliser(files, prof)
        out[pname] = 100.0 * (r - null) / (perfect - null)
    return out


def _raw_at(files: Sequence[NabFile], scores: Sequence[F64],
            profile: tuple[float, float, float], threshold: float) -> float:
    """Raw NAB score when rows with score >= threshold detect."""
    a_tp, a_fp, a_fn = profile
    r = _rows(files)
    s = np.concatenate([np.asarray(sc, np.float64)[f.probation:]
                        for f, sc in zip(files, scores, strict=True)])
    det = s >= threshold
    total = float(np.sum(a_fp * r.fp_cost[det & (r.window < 0)]))
    best = np.full(r.n_windows, -a_fn)
    m = det & (r.window >= 0)
    np.maximum.at(best, r.window[m], a_tp * r.tp_reward[m])
    # Windows wholly inside probation are never scored by NAB's sweeper; count them as missed.
    return total + float(best.sum())
