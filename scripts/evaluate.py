"""Detection quality of the shipped default config on SKAB and NAB, through `edge-agent replay`.

    .venv/bin/python scripts/evaluate.py                      # prints every table
    .venv/bin/python scripts/evaluate.py --doc docs/evaluation.md

Reads ../shared/data (or --data) and exits 0 with a message when it is absent.
The streams are exactly those of `config/agent.example.yaml`: `pump` for SKAB
and `motor-temp` (the single-channel example) for NAB. Nothing here changes a
setting; the ablations switch steps *off* one at a time, and are labelled so.
Each file is replayed by a fresh pipeline (`agent.replay.replay`), so each
file's first rows are its own device's warm-up.

SKAB (outlier protocol): the first 400 rows of each file are the calibration
part; a later row is predicted anomalous when the stream's episode state at
that row is "anomaly" (the newest window ending at or before it); F1, FAR =
FP/(FP+TN), MAR = FN/(FN+TP) over all files pooled. Detection delay is, per
labelled anomaly, the rows from its start to the first row in an episode.
The healthy pump: `anomaly-free.csv`, alerts (episode openings) per hour and
rows in alarm after its warm-up.

NAB: scored by `scripts/evallib/nab.py` (Lavin & Ahmad 2015 and NAB's sweeper;
tests/test_nab_scorer.py checks it against the published result files). Two
readings: the deployed alerts (episode openings), and NAB's own protocol, the
`score` column with one threshold per profile swept over all files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evallib.nab import NabFile, load_corpus, score_detections, sweep

from agent import state
from agent.config import AgentConfig, StreamConfig, detector_for, parse_config
from agent.pipeline import StreamPipeline
from agent.replay import CsvLayout, ReplayResult, replay
from agent.scoring.registry import open_stream_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "agent.example.yaml"
SKAB_STREAM, NAB_STREAM = "pump", "motor-temp"
SKAB_CALIBRATION_ROWS = 400
SKAB = CsvLayout(delimiter=";", time_column="datetime")
NAB = CsvLayout(delimiter=",", time_column="timestamp", columns=("value",))

PUBLISHED_SKAB = [("Conv-AE (leaderboard best; looks 59 samples ahead)", 0.78, 13.55, 28.02),
                  ("T2+Q (PCA), fully online", 0.76, None, None),
                  ("flag every row", 0.70, 100.0, 0.0)]
PUBLISHED_NAB_HERE = [("Numenta HTM", 72.3, 69.1, 76.0), ("ARTime", 69.8, 60.0, 75.2),
                      ("Random Cut Forest", 53.7, 44.9, 60.1),
                      ("windowed Gaussian (NAB's)", 26.5, 2.2, 37.1)]


def shipped() -> AgentConfig:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["state_dir"] = "/nonexistent/edge-agent-eval"  # replay never touches it
    return parse_config(raw, base_dir=EXAMPLE.parent)


def variant(cfg: AgentConfig, name: str, **changes: Any) -> AgentConfig:
    """The config with one stream's settings changed (for an ablation row)."""
    s = next(s for s in cfg.streams if s.name == name)
    for section, values in changes.items():
        cur = getattr(s, section)
        new = (dataclasses.replace(cur, **values)
               if dataclasses.is_dataclass(cur) and not isinstance(cur, type) else values)
        s = dataclasses.replace(s, **{section: new})
    return dataclasses.replace(cfg, streams=[s])


def _stream(cfg: AgentConfig, name: str) -> StreamConfig:
    return next(s for s in cfg.streams if s.name == name)


# -- SKAB --------------------------------------------------------------------------------


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _labels(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    col = lines[0].split(";").index("anomaly")
    return np.array([float(r.split(";")[col]) > 0.5 for r in lines[1:] if r.strip()])


def _delays(pred: np.ndarray, y: np.ndarray) -> list[float]:
    """Per labelled segment: rows from its start to the first predicted row (inf if none)."""
    out = []
    starts = np.flatnonzero(y & ~np.r_[False, y[:-1]])
    for a in starts:
        b = a
        while b < len(y) and y[b]:
            b += 1
        hit = np.flatnonzero(pred[a:b])
        out.append(float(hit[0]) if hit.size else float("inf"))
    return out


def _false_after(pred: np.ndarray, y: np.ndarray) -> int:
    """False-alarm rows right after a labelled anomaly: its episode still closing."""
    out = 0
    ends = np.flatnonzero(y & ~np.r_[y[1:], False])
    for e in ends:
        b = e + 1
        while b < len(y) and pred[b] and not y[b]:
            b += 1
        out += b - e - 1
    return out


def evaluate_skab(cfg: AgentConfig, data: Path) -> dict[str, Any]:
    files = sorted((data / "skab" / "valve1").glob("*.csv"), key=lambda p: int(p.stem))
    tp = fp = tn = fn = 0
    delays: list[float] = []
    per_file: list[dict[str, Any]] = []
    rows = 0
    t0 = time.perf_counter()
    for f in files:
        r = replay(cfg, f, None, stream=SKAB_STREAM, layout=SKAB)
        pred = r.state[SKAB_CALIBRATION_ROWS:] > 0
        y = _labels(f)[SKAB_CALIBRATION_ROWS:]
        tp += int(np.sum(pred & y))
        fp += int(np.sum(pred & ~y))
        tn += int(np.sum(~pred & ~y))
        fn += int(np.sum(~pred & y))
        found = _delays(pred, y)
        delays += found
        rows += r.rows
        per_file.append({"file": f.stem, "delay": found[0] if found else None,
                         "anomalous": int(y.sum()), "caught": int(np.sum(pred & y)),
                         "false": int(np.sum(pred & ~y)),
                         "false_after": _false_after(pred, y)})
    seconds = time.perf_counter() - t0
    free = data / "skab" / "anomaly-free" / "anomaly-free.csv"
    after = np.zeros(0, np.int8)
    healthy_alerts = 0
    if free.is_file():
        r = replay(cfg, free, None, stream=SKAB_STREAM, layout=SKAB)
        after, healthy_alerts = r.state[SKAB_CALIBRATION_ROWS:], r.alerts
    hours = len(after) / 3600.0  # 1 Hz
    found = [d for d in delays if np.isfinite(d)]
    s = _stream(cfg, SKAB_STREAM)
    scorer = (f"8 channels, `model: none`: {detector_for(s)}" if s.model == "none"
              else f"8 channels, `model: {s.model}`")
    return {
        "scorer": scorer, "files": len(files), "f1": _f1(tp, fp, fn),
        "far": 100 * fp / max(fp + tn, 1),
        "mar": 100 * fn / max(fn + tp, 1), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "segments": len(delays), "detected": len(found),
        "delay_median": float(np.median(found)) if found else None,
        "delay_mean": float(np.mean(found)) if found else None,
        "healthy_hours": hours, "healthy_alerts": healthy_alerts,
        "healthy_alerts_per_hour": healthy_alerts / hours if hours else 0.0,
        "healthy_alarm_pct": 100 * float(np.mean(after > 0)) if after.size else 0.0,
        "us_per_row": 1e6 * seconds / max(rows, 1), "per_file": per_file,
    }


# -- NAB ---------------------------------------------------------------------------------


def evaluate_nab(cfg: AgentConfig, files: list[NabFile], data: Path) -> dict[str, Any]:
    scores, alerts = [], []
    t0 = time.perf_counter()
    rows = 0
    for f in files:
        r: ReplayResult = replay(cfg, data / "nab" / f.name, None, stream=NAB_STREAM, layout=NAB)
        scores.append(r.score.astype(np.float64))
        alerts.append(r.alert.astype(bool))
        rows += r.rows
    seconds = time.perf_counter() - t0
    swept = sweep(files, scores)
    deployed = score_detections(files, alerts)
    return {"swept": {k: v.score for k, v in swept.items()},
            "threshold": {k: v.threshold for k, v in swept.items()},
            "deployed": deployed, "alerts": int(sum(a.sum() for a in alerts)),
            "us_per_row_replay": 1e6 * seconds / max(rows, 1)}


def nab_cost(cfg: AgentConfig, files: list[NabFile]) -> dict[str, float]:
    """The pipeline alone (no CSV parsing): µs per sample, and the checkpoint's size."""
    s = _stream(cfg, NAB_STREAM)
    total = 0.0
    n = 0
    size = 0
    for f in files:
        card, scorer = open_stream_model(cfg, s)
        p = StreamPipeline(s, card, scorer)
        ts = f.ts.astype(np.float64)
        v = f.values.astype(np.float32)[:, None]
        t0 = time.perf_counter()
        for a in range(0, len(ts), 32):  # 32-sample frames, as a framed sensor would send
            p.push(ts[a:a + 32], v[a:a + 32])
        total += time.perf_counter() - t0
        n += len(ts)
        size = max(size, len(state.encode({}, p.to_state())))
    return {"us_per_sample": 1e6 * total / n, "state_bytes": float(size)}


# -- report ------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _per_file_lines(skab: dict[str, Any]) -> list[str]:
    rows = skab.get("per_file") or []
    if not rows:
        return []
    out = ["Per valve1 file (rows after the calibration part; the labelled anomaly is the "
           "file's middle part):", "",
           "| file | delay (rows) | anomalous rows caught | false-alarm rows | of them right "
           "after the anomaly |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        d = r["delay"]
        out.append(f"| {r['file']} | {'missed' if d is None or not np.isfinite(d) else f'{d:.0f}'}"
                   f" | {r['caught']} of {r['anomalous']} | {r['false']} | {r['false_after']} |")
    return [*out, ""]


def report(skab: dict[str, Any] | None, skab_ablation: list[tuple[str, dict[str, Any]]],
           nab: dict[str, Any] | None, nab_ablation: list[tuple[str, dict[str, Any]]],
           cost: dict[str, float] | None, seconds: float) -> str:
    out = ["# Detection quality", "",
           "Produced by `.venv/bin/python scripts/evaluate.py --doc docs/evaluation.md` "
           f"({seconds:.0f} s on the 2-core development machine). The streams are those of "
           "`config/agent.example.yaml`, unchanged; the ablation rows switch steps off one at "
           "a time.", ""]
    if skab is not None:
        out += [f"## SKAB: the `pump` stream ({skab['scorer']})", "",
                f"valve1 ({skab['files']} files; the first {SKAB_CALIBRATION_ROWS} rows of "
                "each calibrate; per-row episode state, pooled):", "",
                "| | F1 | FAR % | MAR % | anomalies caught | median delay (rows) |",
                "| --- | --- | --- | --- | --- | --- |",
                f"| edge-agent (shipped defaults) | {skab['f1']:.3f} | {skab['far']:.1f} | "
                f"{skab['mar']:.1f} | {skab['detected']} of {skab['segments']} | "
                f"{_fmt(skab['delay_median'], '.0f')} |"]
        out += [f"| {n} | {f:.2f} | {_fmt(far)} | {_fmt(mar)} | | |"
                for n, f, far, mar in PUBLISHED_SKAB]
        out += ["", f"Healthy pump (`anomaly-free.csv`, {skab['healthy_hours']:.2f} h after "
                f"warm-up): **{skab['healthy_alerts']} alerts** "
                f"({skab['healthy_alerts_per_hour']:.1f} per hour), "
                f"{skab['healthy_alarm_pct']:.1f} % of rows in alarm.", "",
                f"Cost: {skab['us_per_row']:.0f} µs per row through `replay` (CSV parsing "
                "included).", "", *_per_file_lines(skab)]
        if skab_ablation:
            out += ["Ablation, one step of the shipped defaults off at a time (valve1; the "
                    "healthy pump's alerts and rows in alarm):", "",
                    "| variant | F1 | FAR % | MAR % | healthy alerts | healthy rows in alarm % |",
                    "| --- | --- | --- | --- | --- | --- |",
                    f"| shipped defaults | {skab['f1']:.3f} | {skab['far']:.1f} | "
                    f"{skab['mar']:.1f} | {skab['healthy_alerts']} | "
                    f"{skab['healthy_alarm_pct']:.1f} |"]
            out += [f"| {n} | {r['f1']:.3f} | {r['far']:.1f} | {r['mar']:.1f} | "
                    f"{r['healthy_alerts']} | {r['healthy_alarm_pct']:.1f} |"
                    for n, r in skab_ablation]
            out.append("")
    if nab is not None:
        p = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
        out += ["## NAB: the `motor-temp` stream (one channel, `model: none`)", "",
                "Included files (artificialNoAnomaly, artificialWithAnomaly, "
                "realAWSCloudwatch), standard / low FP / low FN:", "",
                "| detector | deployed alerts | threshold swept |", "| --- | --- | --- |",
                "| edge-agent (shipped defaults) | "
                + " / ".join(f"{nab['deployed'][k]:.1f}" for k in p) + " | "
                + " / ".join(f"{nab['swept'][k]:.1f}" for k in p) + " |"]
        out += [f"| {n} (published result files) | | {a} / {b} / {c} |"
                for n, a, b, c in PUBLISHED_NAB_HERE]
        if cost is not None:
            out += ["", f"Cost: {cost['us_per_sample']:.1f} µs per sample through the "
                    "pipeline (frames of 32), a checkpoint of "
                    f"{cost['state_bytes'] / 1024:.0f} KiB per stream (bounded: fixed-size "
                    "rings)."]
        if nab_ablation:
            out += ["", "Ablation (standard profile):", "",
                    "| variant | deployed | swept |", "| --- | --- | --- |"]
            out += [f"| {n} | {r['deployed']['standard']:.1f} | {r['swept']['standard']:.1f} |"
                    for n, r in nab_ablation]
        out.append("")
    return "\n".join(out)


NOTES = """## What was tuned, and on which files

Only on the evaluation data this script reads (`--data`); the same config is checked
elsewhere on files the team does not have, so these figures are the optimistic side.

- **SKAB** (the 16 valve1 files' test parts and `anomaly-free.csv`): the smoothing
  (0.05-0.5 tried), margin (1.0-1.6), `consecutive` (1, 2, 4), `clear_windows` (4, 8,
  12), `clear_ratio` (0.6, 0.8, 0.9), how far above the median a warm-up score must be
  to be dropped as a fault (2, 3, 4 robust spreads), PCA's features (every sample, window
  means, window means and spreads), retained variance (0.85-0.99), shrinkage and
  trimming, its out-of-fold calibration (2, 4, 8 folds), the level tracking's half-life
  (0, 50-20,000 samples) and the onset gate (15-60 windows; it changed nothing here, so
  it ships off), and the int8 model's training horizon and bottleneck. The slow-channel
  share (0.65) was set from warm-up rows only. Not tuned: window 16, hop 4, warm-up 400,
  batch (128 since issue 13, for the frame path's throughput). Replay groups windows as
  the live agent does, by when their samples came: at SKAB's and NAB's rates every
  window is scored alone, so `batch` changes nothing here. Before, replay scored a
  recording in full batches whatever its rate: these figures moved by up to 0.003 F1 as
  `batch` went from 1 to 128, and at 128 two rows of the ablation (`pca_slow: change`,
  `warmup: 300`) stayed in one episode for 97 % of the healthy pump (see "An episode
  that does not end" below).
- **Slow channels left out of PCA** (`pca_slow: skip`, this round's change). Why: in
  valve1 files 1, 2 and 4 the highest warm-up scores came from the Temperature and
  Thermocouple ramps (their within-window spread at 5-9 robust spreads), which put the
  threshold 15-20x above the typical normal score, and the valve faults' flow drops
  (about one flow unit, 2-3 warm-up spreads) stayed below it. Scored on their own, the
  two slow channels gave 28 alerts on the healthy pump and F1 0.17 on valve1: their
  change is the ramp the machine is on, not a fault. With them out, the pump stream's
  margin (1.2-1.5 score alike; 1.3 ships) and level tracking were re-checked: with the
  recursive PCA following the machine, level tracking on top of it (`input_halflife`
  100-400) absorbs part of a fault's slow start and costs the healthy pump 2 alerts, so
  the pump stream ships with 0. Around the shipped point, one setting at a time
  (margin 1.2-1.4, `clear_windows` 6-10, `clear_ratio` 0.7-0.9, smoothing 0.3-0.5,
  `pca_halflife` 500-2,000, `consecutive` 2, a fixed threshold), valve1 F1 stays between
  0.838 and 0.847 and the healthy pump between 0 and 1 alert. Not dropped from the
  product: `pca_slow: change` scores the slow channels' change as before, for machines
  where a temperature's ramp is itself the fault.
- **Recursive PCA** (`pca_halflife`): half-lives of 250, 500, 1,000 and 2,000 windows
  were tried; 1,000 (about an hour at 1 Hz with hop 4) ships as the middle. The bounded
  influence of a learnt window (3x the typical normal score; 1.5 and 6 tried) trades
  valve1 recall against the healthy pump's alerts monotonically; 3 is the middle. Also
  tried and dropped: a multivariate EWMA of the features (more sensitive to drift than
  to faults), level tracking during episodes (the recovery after a fault then looks like
  a new fault), level tracking simulated inside the warm-up's calibration, a threshold
  from the median warm-up score times a factor, longer windows (32, 64), de-trending the
  slow channels against an always-tracked baseline (fewer healthy alerts, more valve1
  false alarms), clipping each PCA feature at a few robust spreads (it clips the valve
  faults' flow drop too: F1 0.08-0.78), and the slow channels as a second PCA with its
  own threshold OR-ed with the first (their ramps alert on the healthy pump even at 5x
  their warm-up maximum).
- **Fragile choices**: PCA's 95 % retained variance is a sharp optimum on valve1 (0.90
  doubles the false alarms, 0.99 loses a tenth of F1).
- **NAB** (the included files): the detector (windowed Gaussian against fuzzy ART,
  KNN and an EWMA z-score: `.venv/bin/python scripts/evallib/nab_eval.py` prints them),
  the threshold 0.45 (the middle of a flat stretch from 0.35 to 0.5), the out-of-range
  fraction (0.05-0.3), the rest period and the warm-up (100-300 samples change less
  than one labelled window).

## What falls short

- **valve1 F1 is below 0.85** (0.847). Most of the missed rows are the delay: in 8 of
  the 16 files the flow falls 40-60 rows after the labelled start (the label marks the
  valve command, the flow follows), and a causal detector cannot see it earlier. Two
  files' faults (a drop of about one flow unit, the flow's quantum) are still missed.
  Most false-alarm rows are the end of an episode: the hysteresis keeps it open for
  `clear_windows` windows after the flow has come back (the per-file table).
- **Why the last hundredth was not chased.** After last round's changes, each of those
  error sources was attacked once more, none of it shipped:
  - the rule: closing an episode early once the score is back near the normal level,
    or closing on the raw score instead of the smoothed one;
  - the threshold: a second, slower smoothing with its own warm-up threshold OR-ed in,
    a threshold from the warm-up's median and MAD instead of its maximum, and one that
    follows the normal level faster at first;
  - the features: PCA's features standardised by their own warm-up spread, the
    quantised flow's window spread floored or dropped, a per-feature maximum in place
    of T2+Q, and hop 2.

  The rule and threshold variants were replayed offline on the shipped config's
  recorded scores (they ignore what a different rule would have let the PCA learn);
  the feature variants ran in full. None reached 0.85. The best cell of any grid came
  within a few thousandths of it, next to cells a hundredth lower, and picking it would
  be tuning to these 16 files. What is left is
  structural: the label leads the flow, two faults are as small as their warm-up's own
  wander, and a 400-row warm-up is too short to calibrate a statistic slow enough to
  add up a small, sustained shift.
- **A fault that shows only in a slow channel is not seen.** With `pca_slow: skip` the
  pump stream does not look at Temperature and Thermocouple. A fault that moves only
  those (warmer water fed to the pump, say) raises nothing. `pca_slow: change` scores
  their change within each window again, at the cost its ablation row shows. The
  evaluation data hold no labelled example of such a fault.
- **An episode that does not end.** Inside an episode nothing adapts: the threshold,
  the level tracking and PCA learn only from windows judged normal, so a fault does not
  teach itself into the normal. The price: when the stream's normal moves while an
  episode is open, or the detector had not yet learnt the normal it is in, the scores
  stay high and the episode never closes. Replay used to score a recording in full
  batches whatever its rate; at `batch: 128` (8.5 minutes of the pump) the first batch
  after the warm-up was scored before PCA learnt any of it, an episode opened, and with
  `pca_slow: change` or `warmup: 300` the healthy pump then stayed in it for 97 % of the
  file. Live at 1 Hz each window is scored alone, and replay now does the same, so that
  lag is gone. The lock itself has a way out now: an episode open for
  `adapt.relearn_after_s` (1 h) is learnt from as normal and closes once the detector
  has followed (`tests/test_relearn.py`: a current that steps up for good). It changes
  no figure here: no episode in these files lasts an hour, except in the `pca_halflife:
  0` row, where the projection never learns and the threshold may rise only by its
  factor 2, so that episode stays open.
- **Held-out data**: the margin and the level tracking were re-chosen on these files.
  Both sit in the middle of flat stretches, but expect other files to differ by a few
  hundredths of F1. The healthy pump's silence is not robust to a shorter warm-up:
  with 300 samples it raises 4 alerts (the sensitivity row), one of them at its
  deepest flow dip (a drop of 3.5 flow units for about a minute, near row 1,990).
- **The int8 model is the weaker scorer here** (see the ablation): an autoencoder
  reconstructs a constant offset across a window well, so a sustained flow drop adds
  little error. The shipped pump stream therefore uses PCA T2+Q; the model remains for
  fleets that train their own.
- **NAB**: below HTM on the same files. Most of the score comes from the
  post-processing, the out-of-range rule above all; anomalies of shape inside the
  normal range (art_daily_flatmiddle, jumpsdown, nojump) are missed.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--doc", type=Path, help="also write the report (markdown) here")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--only", choices=("skab", "nab"))
    args = ap.parse_args()
    if not (args.data / "skab").is_dir() and not (args.data / "nab").is_dir():
        print(f"no evaluation data under {args.data}; nothing to evaluate")
        return 0
    t0 = time.perf_counter()
    cfg = shipped()
    skab = nab = cost = None
    skab_ab: list[tuple[str, dict[str, Any]]] = []
    nab_ab: list[tuple[str, dict[str, Any]]] = []
    if args.only != "nab" and (args.data / "skab").is_dir():
        skab = evaluate_skab(cfg, args.data)
        print(json.dumps({"skab": {k: v for k, v in skab.items() if k != "per_file"}},
                         indent=1))
        if not args.no_ablation:
            for name, c in skab_ablations(cfg):
                skab_ab.append((name, evaluate_skab(c, args.data)))
                print(name, {k: round(v, 3) for k, v in skab_ab[-1][1].items()
                             if k in ("f1", "far", "mar", "healthy_alerts")})
    if args.only != "skab" and (args.data / "nab").is_dir():
        labels = json.loads((args.data / "nab" / "combined_windows.json").read_text())
        folders = sorted({k.split("/")[0] for k in labels if (args.data / "nab" / k).is_file()})
        files = load_corpus(args.data / "nab", folders)
        nab = evaluate_nab(cfg, files, args.data)
        cost = nab_cost(cfg, files)
        print(json.dumps({"nab": nab, "cost": cost}, indent=1))
        if not args.no_ablation:
            for name, c in nab_ablations(cfg):
                nab_ab.append((name, evaluate_nab(c, files, args.data)))
                print(name, nab_ab[-1][1]["deployed"]["standard"],
                      nab_ab[-1][1]["swept"]["standard"])
    text = (report(skab, skab_ab, nab, nab_ab, cost, time.perf_counter() - t0)
            + "\n" + NOTES)
    print(text)
    if args.doc:
        args.doc.write_text(text)
    return 0


def skab_ablations(cfg: AgentConfig) -> list[tuple[str, AgentConfig]]:
    """The pump stream with one step of the shipped defaults switched off at a time."""
    s = _stream(cfg, SKAB_STREAM)
    return [
        ("the shipped int8 model (`model: skab-ae`) instead of PCA, with the level "
         "tracking and margin a model needs (the schema's)",
         variant(cfg, SKAB_STREAM, model="skab-ae", transforms={},
                 adapt={"input_halflife": 100}, alert={"margin": 1.15})),
        ("projection fixed after warm-up (`pca_halflife: 0`: no recursive PCA)",
         variant(cfg, SKAB_STREAM, adapt={"pca_halflife": 0})),
        ("slow channels scored by their change too (`pca_slow: change`)",
         variant(cfg, SKAB_STREAM, adapt={"pca_slow": "change"})),
        ("added: level tracking outside episodes (`input_halflife: 100`, the schema default)",
         variant(cfg, SKAB_STREAM, adapt={"input_halflife": 100})),
        ("the schema's margin (`margin: 1.15`)",
         variant(cfg, SKAB_STREAM, alert={"margin": 1.15})),
        ("as last round: `pca_slow: change`, `input_halflife: 100`, `margin: 1.15`",
         variant(cfg, SKAB_STREAM, adapt={"pca_slow": "change", "input_halflife": 100},
                 alert={"margin": 1.15})),
        ("sensitivity, not a step: a shorter warm-up (`warmup: 300`)",
         variant(cfg, SKAB_STREAM, warmup=300)),
        ("added: the onset gate (`onset_windows: 30`)",
         variant(cfg, SKAB_STREAM, alert={"onset_windows": 30})),
        ("no slow-channel transform (every field by its level)",
         variant(cfg, SKAB_STREAM, transforms={f: "level" for f in s.fields})),
        ("no smoothing (`smoothing: 1`)", variant(cfg, SKAB_STREAM, alert={"smoothing": 1.0})),
        ("threshold as before: 0.999 quantile x 1.5",
         variant(cfg, SKAB_STREAM, alert={"quantile": 0.999, "margin": 1.5})),
        ("no hysteresis (closes on the first window below the threshold)",
         variant(cfg, SKAB_STREAM, alert={"clear_windows": 1, "clear_ratio": 1.0})),
        ("threshold fixed after warm-up (`threshold_halflife: 0`)",
         variant(cfg, SKAB_STREAM, adapt={"threshold_halflife": 0})),
        ("added: the single-channel post-processing (likelihood, rest period) on the PCA score",
         variant(cfg, SKAB_STREAM, postprocess={"mode": "on"})),
    ]


def nab_ablations(cfg: AgentConfig) -> list[tuple[str, AgentConfig]]:
    """The learner alone, then each post-processing step added."""
    on = {"mode": "on"}
    return [
        ("learner alone (raw score, threshold 0.45 on it)",
         variant(cfg, NAB_STREAM, postprocess={**on, "likelihood": False, "range_rule": False,
                                               "rest_windows": 0})),
        ("+ anomaly likelihood", variant(cfg, NAB_STREAM, postprocess={
            **on, "range_rule": False, "rest_windows": 0})),
        ("+ rest period", variant(cfg, NAB_STREAM, postprocess={**on, "range_rule": False})),
        ("+ range rule (= shipped)", variant(cfg, NAB_STREAM, postprocess=on)),
    ]


if __name__ == "__main__":
    sys.exit(main())
