"""Detection quality on SKAB (valve1) and NAB, through `edge-agent replay`'s code path.

    .venv/bin/python scripts/evaluate.py                 # both, prints tables
    .venv/bin/python scripts/evaluate.py --doc docs/evaluation.md

Reads ../shared/data (or --data); exits 0 with a message when it is absent.
Every file is replayed by a fresh agent (agent.replay.replay: the live
per-stream pipeline minus MQTT), so each file's first rows are its device's
warm-up. Nothing is tuned here: the configs below are fixed.

SKAB protocol (../shared/data/README.md): the first 400 rows of each file are
the calibration part (the agent's warm-up), the rest the test part; a row is
predicted anomalous when its anomaly score is above 0.5 (its window's raw
score is above the adaptive threshold); F1, FAR = FP/(FP+TN) and
MAR = FN/(FN+TP) over the test parts of all files pooled.

NAB: implemented from Lavin & Ahmad (2015): labelled windows, the scaled
sigmoid 2/(1+e^(5y)) - 1 of a detection's position relative to its window's
end (y in [-1, 0] inside the window, > 0 after it), only the first detection in
a window counts, a missed window costs A_FN, false positives cost A_FP x the
sigmoid of their distance past the preceding window (x 1 when none precedes),
detections in the probationary period (first 15 %, at most 750 rows) are
ignored, and the normalised score is 100 x (S - S_null) / (S_perfect - S_null)
over all files, the null detector detecting nothing and the perfect one
detecting at the start of every window. Two readings: the agent's own alerts
(as deployed), and NAB's usual one, a threshold on the score column swept per
profile to its best value over all files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import parse_config
from agent.replay import CsvLayout, replay

REPO = Path(__file__).resolve().parent.parent
SKAB_FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
               "Thermocouple", "Voltage", "Volume Flow RateRMS"]
SKAB_CALIBRATION_ROWS = 400

# The stream each benchmark is replayed through (written to a temp YAML, shown in the doc).
SKAB_STREAM: dict[str, Any] = {
    "name": "pump", "topic": "sensors/pump", "fields": SKAB_FIELDS, "model": "skab-ae",
    "window": 16, "hop": 1, "warmup": SKAB_CALIBRATION_ROWS, "batch": 32,
    "alert": {"threshold": "auto", "quantile": 0.999, "margin": 1.5, "consecutive": 1,
              "cooldown_s": 60},
}
NAB_STREAM: dict[str, Any] = {
    "name": "nab", "topic": "sensors/nab", "fields": ["value"], "model": "none",
    "window": 16, "hop": 1, "batch": 32,
    "alert": {"threshold": "auto", "quantile": 0.999, "margin": 1.5, "consecutive": 1,
              "cooldown_s": 6 * 3600},
    "adapt": {"detector": "gaussian", "hst_window": 250},
}

PROFILES = {  # A_TP, A_FP, A_FN (Lavin & Ahmad, table 1)
    "standard": (1.0, 0.11, 1.0),
    "reward_low_FP": (1.0, 0.22, 1.0),
    "reward_low_FN": (1.0, 0.11, 2.0),
}
PUBLISHED_SKAB = [("Conv-AE", 0.78, 13.55, 28.02), ("MSET", 0.78, 39.73, None),
                  ("T2+Q (PCA)", 0.76, None, None), ("LSTM-AE", 0.74, None, None),
                  ("Isolation Forest", 0.29, None, None)]
PUBLISHED_NAB_HERE = [("Numenta HTM", 72.3, 69.1, 76.0), ("ARTime", 69.8, 60.0, 75.2),
                      ("Random Cut Forest", 53.7, 44.9, 60.1),
                      ("windowed Gaussian", 26.5, 2.2, 37.1)]


def _config(stream: dict[str, Any], tmp: Path) -> Any:
    raw = {"device_id": "eval", "state_dir": str(tmp / "state"), "streams": [stream]}
    return parse_config(raw, base_dir=REPO)


# -- SKAB --------------------------------------------------------------------------------


def skab_files(data: Path, limit: int | None) -> list[Path]:
    files = sorted((data / "skab" / "valve1").glob("*.csv"), key=lambda p: int(p.stem))
    return files[:limit] if limit else files


# The same stream with adaptation off (warm-up scaling and threshold stay fixed): an ablation.
SKAB_FROZEN: dict[str, Any] = {**SKAB_STREAM, "adapt": {"input_halflife": 0,
                                                        "threshold_halflife": 0,
                                                        "drift": "none"}}


def evaluate_skab(files: list[Path], tmp: Path, stream: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    layout = CsvLayout(delimiter=";", time_column="datetime")
    cfg = _config(stream or SKAB_STREAM, tmp)
    tp = fp = tn = fn = 0
    alerts = drifts = 0
    per_file = []
    for f in files:
        labels = np.array([float(line.split(";")[-2]) for line in
                           f.read_text().splitlines()[1:] if line.strip()])
        r = replay(cfg, f, None, layout=layout)
        pred = r.score[SKAB_CALIBRATION_ROWS:] > 0.5
        y = labels[SKAB_CALIBRATION_ROWS:] > 0.5
        a, b, c, d = (int(np.sum(pred & y)), int(np.sum(pred & ~y)),
                      int(np.sum(~pred & ~y)), int(np.sum(~pred & y)))
        tp, fp, tn, fn = tp + a, fp + b, tn + c, fn + d
        alerts += r.alerts
        drifts += r.drift_events
        per_file.append((f.name, _f1(a, b, d)))
    return {"files": len(files), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "f1": _f1(tp, fp, fn),
            "far": 100 * fp / max(1, fp + tn), "mar": 100 * fn / max(1, fn + tp),
            "alerts": alerts, "drift_events": drifts, "per_file": per_file}


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / max(1, 2 * tp + fp + fn)


# -- NAB ---------------------------------------------------------------------------------


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


@dataclass
class NabFile:
    name: str
    ts: np.ndarray
    windows: list[tuple[int, int]]  # row index ranges, inclusive
    probation: int
    score: np.ndarray | None = None
    alert: np.ndarray | None = None


def probation_rows(n: int) -> int:
    return min(math.floor(0.15 * n), 750)


def nab_files(data: Path, limit: int | None) -> list[NabFile]:
    labels = json.loads((data / "nab" / "combined_windows.json").read_text())
    out = []
    for name in sorted(labels)[: limit or None]:
        path = data / "nab" / name
        rows = path.read_text().splitlines()[1:]
        ts = np.array([_ts(r.split(",")[0]) for r in rows if r.strip()])
        wins = []
        for a, b in labels[name]:
            ia = int(np.searchsorted(ts, _ts(a), side="left"))
            ib = int(np.searchsorted(ts, _ts(b), side="right")) - 1
            wins.append((ia, ib))
        out.append(NabFile(name, ts, wins, probation_rows(len(ts))))
    return out


def sigmoid(y: float) -> float:
    """NAB's scaled sigmoid: ~1 early in a window, 0 at its end, -> -1 well after it."""
    if y > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def nab_file_score(f: NabFile, detections: np.ndarray, profile: tuple[float, float, float]
                   ) -> float:
    """Raw NAB score of one file for boolean per-row detections."""
    a_tp, a_fp, a_fn = profile
    score = 0.0
    hit = [False] * len(f.windows)
    for i in np.flatnonzero(detections):
        if i < f.probation:
            continue
        inside = next((k for k, (s, e) in enumerate(f.windows) if s <= i <= e), None)
        if inside is not None:
            s, e = f.windows[inside]
            if not hit[inside]:
                hit[inside] = True
                score += a_tp * sigmoid(-(e - i) / (e - s + 1))
            continue
        before = [(s, e) for s, e in f.windows if e < i]
        if before:
            s, e = before[-1]
            score += a_fp * sigmoid((i - e) / (e - s + 1))
        else:
            score -= a_fp
    score -= a_fn * hit.count(False)
    return score


def nab_normalised(files: list[NabFile], dets: list[np.ndarray],
                   profile: tuple[float, float, float]) -> float:
    raw = sum(nab_file_score(f, d, profile) for f, d in zip(files, dets, strict=True))
    null = sum(nab_file_score(f, np.zeros(len(f.ts), bool), profile) for f in files)
    perfect_dets = []
    for f in files:
        d = np.zeros(len(f.ts), bool)
        for s, _ in f.windows:
            d[s] = True
        perfect_dets.append(d)
    perfect = sum(nab_file_score(f, d, profile) for f, d in zip(files, perfect_dets, strict=True))
    return 100.0 * (raw - null) / (perfect - null) if perfect != null else 0.0


def _onsets(above: np.ndarray) -> np.ndarray:
    """Rows where the score crosses the threshold upwards: the alerts a live rule would raise."""
    out = above.copy()
    out[1:] &= ~above[:-1]
    return out


def evaluate_nab(files: list[NabFile], data: Path, tmp: Path, detector: str = "gaussian"
                 ) -> dict[str, Any]:
    alerts = drifts = 0
    for f in files:
        stream = dict(NAB_STREAM)
        stream["adapt"] = {**NAB_STREAM["adapt"], "detector": detector}
        hst = stream["adapt"]["hst_window"]
        # The probationary period is the warm-up, but never shorter than what a
        # model: none stream needs to learn its scaling and detector.
        need = 2 * (stream["window"] + (hst if detector == "hst" else 100) * stream["hop"])
        stream["warmup"] = max(f.probation, need)
        r = replay(_config(stream, tmp), data / "nab" / f.name, None)
        f.score, f.alert = r.score, r.alert.astype(bool)
        alerts += r.alerts
        drifts += r.drift_events
    out: dict[str, Any] = {"files": len(files), "windows": sum(len(f.windows) for f in files),
                           "alerts": alerts, "drift_events": drifts, "deployed": {},
                           "swept": {}}
    for pname, prof in PROFILES.items():
        out["deployed"][pname] = nab_normalised(files, [f.alert for f in files], prof)
        best = (-math.inf, 0.5)
        for thr in np.round(np.arange(0.02, 1.0, 0.01), 2):
            s = nab_normalised(files, [_onsets(f.score >= thr) for f in files], prof)
            best = max(best, (s, float(thr)))
        out["swept"][pname] = best
    return out


# -- report ------------------------------------------------------------------------------


def report(skab: dict[str, Any] | None, nab: dict[str, Any] | None, cmd: str,
           seconds: float, frozen: dict[str, Any] | None = None) -> str:
    lines = ["# Detection quality: SKAB and NAB", "",
             "Produced by (" + f"{seconds:.0f} s on this 2-core machine):", "", "```sh",
             cmd, "```", "",
             "Every file is replayed through `agent.replay.replay` (what `edge-agent replay` "
             "runs: the live per-stream pipeline minus MQTT) by a fresh agent, so each "
             "file's first rows are the device's warm-up. The configs are fixed in "
             "`scripts/evaluate.py`; nothing was tuned on the test parts, except where a "
             "table says *threshold swept* (NAB's own protocol for its published scores).",
             ""]
    if skab is not None:
        lines += ["## SKAB valve1 (shipped int8 model `skab-ae` + adaptation)", "",
                  f"{skab['files']} files; first {SKAB_CALIBRATION_ROWS} rows of each are the "
                  "warm-up (scaling learnt on all of them, then every warm-up window scored "
                  "with it: threshold = 0.999-quantile x 1.5 of those scores), the rest is "
                  "tested. A row is "
                  "predicted anomalous when its window's anomaly score is > 0.5. Pooled over "
                  "the test parts:", "",
                  "| detector | F1 | FAR % | MAR % |", "| --- | --- | --- | --- |",
                  f"| **edge-agent (skab-ae int8, window 16, hop 1)** | **{skab['f1']:.2f}** | "
                  f"**{skab['far']:.2f}** | **{skab['mar']:.2f}** |"]
        if frozen is not None:
            lines.append(f"| edge-agent, adaptation off (ablation) | {frozen['f1']:.2f} | "
                         f"{frozen['far']:.2f} | {frozen['mar']:.2f} |")
        # Labels alone: the test parts are about half anomalous, so flagging every row
        # already scores a high F1. FAR is what separates a usable detector from it.
        pos, neg = skab["tp"] + skab["fn"], skab["fp"] + skab["tn"]
        lines.append(f"| every row anomalous (trivial baseline) | {2 * pos / (2 * pos + neg):.2f} "
                     f"| 100.00 | 0.00 |")
        for name, f1, far, mar in PUBLISHED_SKAB:
            lines.append(f"| {name} (published, full SKAB) | {f1:.2f} | "
                         f"{'' if far is None else f'{far:.2f}'} | "
                         f"{'' if mar is None else f'{mar:.2f}'} |")
        lines += ["", f"Confusion over test rows: TP {skab['tp']}, FP {skab['fp']}, "
                  f"TN {skab['tn']}, FN {skab['fn']}. Alerts raised (cooldown 60 s): "
                  f"{skab['alerts']}; drift detections: {skab['drift_events']}.", "",
                  "Per file F1: " + ", ".join(f"{n} {v:.2f}" for n, v in skab["per_file"]),
                  ""]
    if nab is not None:
        lines += ["## NAB (artificialNoAnomaly, artificialWithAnomaly, realAWSCloudwatch)", "",
                  f"{nab['files']} files, {nab['windows']} labelled windows; `model: none` "
                  "with its default detector (windowed Gaussian: the last 10 samples' mean "
                  "against an exponentially weighted long-run mean and spread, half-life "
                  "2200 samples, chosen to weigh the past like NAB's 6400-sample window, "
                  "not tuned here) + adaptation, window 16, hop 1, warm-up = the "
                  "probationary period. The river HalfSpaceTrees detector "
                  "(`adapt.detector: hst`) is shown for comparison.", "",
                  "| detector | standard | reward low FP | reward low FN |",
                  "| --- | --- | --- | --- |"]
        d, s = nab["deployed"], nab["swept"]
        lines.append(f"| **edge-agent, its own alerts (cooldown 6 h)** | "
                     f"**{d['standard']:.1f}** | **{d['reward_low_FP']:.1f}** | "
                     f"**{d['reward_low_FN']:.1f}** |")
        lines.append("| **edge-agent, threshold on score swept per profile** | " + " | ".join(
            f"**{s[p][0]:.1f}** (>= {s[p][1]:.2f})" for p in PROFILES) + " |")
        if "hst" in nab:
            hd, hs = nab["hst"]["deployed"], nab["hst"]["swept"]
            lines.append(f"| edge-agent with `detector: hst`, its own alerts | "
                         f"{hd['standard']:.1f} | {hd['reward_low_FP']:.1f} | "
                         f"{hd['reward_low_FN']:.1f} |")
            lines.append("| edge-agent with `detector: hst`, threshold swept | " + " | ".join(
                f"{hs[p][0]:.1f} (>= {hs[p][1]:.2f})" for p in PROFILES) + " |")
        for name, a, b, c in PUBLISHED_NAB_HERE:
            lines.append(f"| {name} (published results, threshold swept, these files) | "
                         f"{a} | {b} | {c} |")
        lines += ["", "*Threshold swept*: a detection is a row where the score crosses the "
                  "threshold upwards (the alerts a rule with cooldown 0 would raise); the best "
                  "threshold in 0.02..0.99 per profile over all files (below 0.5 is below "
                  "the agent's own threshold).", "",
                  f"Alerts raised: {nab['alerts']}; drift detections: "
                  f"{nab['drift_events']}. Published full-corpus standard scores: HTM 70.1, "
                  "Random Cut Forest 51.7, windowed Gaussian 39.6.", ""]
    zeros = sum(1 for _, v in skab["per_file"] if v == 0) if skab else 0
    f1 = skab["f1"] if skab else float("nan")
    lines += ["## What these numbers say (as of the commit that wrote this file)", "",
              "- Both fall short of the published detectors. On SKAB the shipped model "
              "(trained on another recording of the rig) with this device's warm-up scaling "
              f"reaches F1 {f1:.2f} against Conv-AE's 0.78 (FAR 13.55 %). F1 alone flatters: "
              "the test parts are about half anomalous, so flagging every row scores 0.70; "
              "the false-alarm rate is what a user lives with. "
              f"{zeros} of the files score F1 0: their normal state moves within the 400-row "
              "calibration part, so the warm-up threshold ends above the anomalies. "
              "Learning the scaling from the whole warm-up and then scoring every warm-up "
              "window (instead of scaling on rows 0-200 and thresholding on rows 200-400) "
              "raised F1 from 0.56 to 0.61 at about the same FAR. Online adaptation changes "
              "little here (the files are ~1,100 rows; the half-lives are thousands): the "
              "ablation row is the same pipeline frozen. A per-device model trained on each "
              "file's first 400 rows (what the published detectors do) is what it would take "
              "to close the gap; the shipped model is trained once, on another recording.",
              "- On NAB the default `model: none` detector (a windowed Gaussian in numpy, no "
              "river) scores above the published windowed Gaussian and below Random Cut "
              "Forest and HTM; its own alerts (6 h cooldown) score higher than the swept "
              "threshold, whose every upward crossing counts. river's HalfSpaceTrees over "
              "window features (`adapt.detector: hst`) scores below the null detector: its "
              "scores on normal data are high and noisy, so it raises the false positives "
              "NAB penalises. HTM's 72.3 stays out of reach of either.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--only", choices=["skab", "nab"])
    ap.add_argument("--limit", type=int, default=None, help="first N files of each benchmark")
    ap.add_argument("--doc", type=Path, help="also write the tables to this markdown file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not (args.data / "skab").is_dir() and not (args.data / "nab").is_dir():
        print(f"no evaluation data at {args.data}; nothing to evaluate (skipped)")
        return 0
    t0 = time.monotonic()
    skab = nab = frozen = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "skab") and (args.data / "skab").is_dir():
            skab = evaluate_skab(skab_files(args.data, args.limit), Path(tmp))
            frozen = evaluate_skab(skab_files(args.data, args.limit), Path(tmp), SKAB_FROZEN)
        if args.only in (None, "nab") and (args.data / "nab").is_dir():
            nab = evaluate_nab(nab_files(args.data, args.limit), args.data, Path(tmp))
            nab["hst"] = evaluate_nab(nab_files(args.data, args.limit), args.data, Path(tmp),
                                      "hst")
    cmd = "python scripts/evaluate.py " + " ".join(sys.argv[1:])
    text = report(skab, nab, cmd.strip(), time.monotonic() - t0, frozen)
    print(text)
    if args.doc:
        args.doc.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
