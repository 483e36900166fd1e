"""Backtesting: a recorded CSV through the stream's pipeline, exactly as live, minus MQTT.

The rows go into a fresh ``StreamPipeline`` (ring buffer, features, scorer,
calibrator, episodes) in the groups of windows the live agent would score together
(``_pushes``); its events are collected in a list. No
broker, no outbox, no threads, and nothing of the device's state is touched.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.config import AgentConfig, StreamConfig
from agent.pipeline import Drift, Episode, ScoreBatch, StreamPipeline
from agent.scoring.registry import open_stream_model

__all__ = ["CsvLayout", "ReplayError", "ReplayResult", "read_csv", "replay"]

log = logging.getLogger(__name__)

# Epoch numbers above this are milliseconds (as in the live decoder).
_MS_THRESHOLD = 1e11


class ReplayError(ValueError):
    """A CSV or stream choice that cannot be replayed; the message says why."""


@dataclass(frozen=True)
class CsvLayout:
    """How to read a recording: NAB is the default, SKAB is ``;`` and ``datetime``."""

    delimiter: str = ","
    time_column: str = "timestamp"
    # CSV columns that feed the stream's fields, in the fields' order; default: the
    # columns named like the fields.
    columns: tuple[str, ...] | None = None


@dataclass
class Recording:
    header: list[str]
    rows: list[list[str]]
    ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float32]  # (n, channels)
    valid: npt.NDArray[np.bool_]  # rows with a time and finite numbers in every used column
    columns: tuple[str, ...]
    time_column: str


@dataclass
class ReplayResult:
    rows: int
    rows_skipped: int
    windows: int
    alerts: int
    drift_events: int
    threshold: float | None
    score: npt.NDArray[np.float32] = field(repr=False)
    alert: npt.NDArray[np.int8] = field(repr=False)
    # Per row: the episode state (1 while an episode is open) and its number (0: none).
    state: npt.NDArray[np.int8] = field(repr=False, default_factory=lambda: np.zeros(0, np.int8))
    episode: npt.NDArray[np.int64] = field(repr=False,
                                           default_factory=lambda: np.zeros(0, np.int64))
    resolved: int = 0


def _parse_time(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if dt.tzinfo is None:  # recordings without a zone are read as UTC
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    if not math.isfinite(t):
        raise ValueError(f"not a time: {text!r}")
    return t / 1000.0 if abs(t) > _MS_THRESHOLD else t


def read_csv(path: Path, fields: Sequence[str], layout: CsvLayout) -> Recording:
    """Read a recording; raise ReplayError for a missing column or an empty file."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=layout.delimiter)
            header = next(reader, None)
            rows = [r for r in reader if r]
    except OSError as e:
        raise ReplayError(f"{path}: {e.strerror or e}") from e
    if not header:
        raise ReplayError(f"{path}: empty file")
    header = [h.strip() for h in header]
    columns = layout.columns or tuple(fields)
    if len(columns) != len(fields):
        raise ReplayError(f"--columns names {len(columns)} columns; the stream has "
                          f"{len(fields)} fields ({', '.join(fields)})")
    missing = [c for c in (layout.time_column, *columns) if c not in header]
    if missing:
        raise ReplayError(f"{path}: no column {', '.join(map(repr, missing))} (columns: "
                          f"{', '.join(header)}; delimiter {layout.delimiter!r})")
    ti = header.index(layout.time_column)
    vi = [header.index(c) for c in columns]
    n = len(rows)
    ts = np.zeros(n, np.float64)
    values = np.zeros((n, len(vi)), np.float32)
    valid = np.ones(n, bool)
    for k, r in enumerate(rows):
        try:
            ts[k] = _parse_time(r[ti])
            v = [float(r[i]) for i in vi]
            if not all(math.isfinite(x) for x in v):
                raise ValueError("non-finite value")
            values[k] = v
        except (ValueError, IndexError):
            valid[k] = False
    return Recording(header, rows, ts, values, valid, tuple(columns), layout.time_column)


def pick_stream(cfg: AgentConfig, name: str | None) -> StreamConfig:
    names = [s.name for s in cfg.streams]
    if name is None:
        if len(cfg.streams) != 1:
            raise ReplayError(f"the config has {len(names)} streams; pick one with --stream "
                              f"({', '.join(names)})")
        return cfg.streams[0]
    for s in cfg.streams:
        if s.name == name:
            return s
    raise ReplayError(f"no stream {name!r} in the config (streams: {', '.join(names)})")


def _pushes(ts: npt.NDArray[np.float64], s: StreamConfig) -> list[int]:
    """Where each push of the recording's samples ends (exclusive): one push per group of
    windows the live agent would score together, then the samples after the last window.

    Live, a window that comes ``max_delay_ms`` or more after the previous ones is scored
    alone, and windows that come closer together share a model call, up to ``batch``
    (``agent/ingest.py``). A row's timestamp stands for its arrival: at 1 Hz every
    window is scored alone, as on the device, and what the threshold, the scaling and
    the detector learn from one window is there for the next. Groups are also capped
    so that the ring never overruns (live, it would drop the oldest windows).
    """
    n, window, hop = len(ts), s.window, s.hop
    delay = s.max_delay_ms / 1000.0
    most = max(1, min(s.batch, (s.buffer - s.window) // hop))
    ends = ts[window - 1::hop].tolist()  # the time each window's last sample came
    out: list[int] = []
    k = 0
    while k < len(ends):
        first, j = ends[k], k + 1
        while j < len(ends) and j - k < most and (ends[j] - first < delay or ends[j] <= first):
            j += 1
        out.append(window + (j - 1) * hop)
        k = j
    if n and (not out or out[-1] < n):
        out.append(n)
    return out


def replay(
    cfg: AgentConfig,
    csv_path: Path,
    out_path: Path | None,
    *,
    stream: str | None = None,
    layout: CsvLayout = CsvLayout(),
) -> ReplayResult:
    """Run a recording through the stream's pipeline; write one output row per input row."""
    s = pick_stream(cfg, stream)
    rec = read_csv(csv_path, s.fields, layout)
    n = len(rec.rows)
    good = np.flatnonzero(rec.valid)
    if good.size and np.any(np.diff(rec.ts[good]) < 0):
        log.warning("%s: timestamps go backwards; replayed in file order", csv_path)
    # A throw-away copy: the device's state directory and fleet store are never read.
    run_cfg = dataclasses.replace(cfg, streams=[s],
                                  fleet=dataclasses.replace(cfg.fleet, enabled=False))
    card, scorer = open_stream_model(run_cfg, s)
    pipe = StreamPipeline(s, card, scorer)
    score = np.zeros(n, np.float32)
    has_score = np.zeros(n, bool)
    raw = np.full(n, np.nan, np.float32)
    alert = np.zeros(n, np.int8)
    episode = np.zeros(n, np.int64)
    drifts = resolved = 0
    prev = 0  # episode number of the window before
    a = 0
    for b in _pushes(rec.ts[good], s):
        idx = good[a:b]
        a = b
        for e in pipe.push(rec.ts[idx], rec.values[idx]):
            if isinstance(e, ScoreBatch):
                # Row number (in the file) of each window's last sample.
                rows = good[e.end_index - 1]
                score[rows], raw[rows], episode[rows] = e.anomaly, e.raw, e.episode
                has_score[rows] = True
                # An alert went out at each window where a new episode opened.
                before = np.concatenate([[prev], e.episode[:-1]])
                alert[rows[(e.episode > 0) & (e.episode != before)]] = 1
                prev = int(e.episode[-1])
            elif isinstance(e, Episode) and e.kind == "resolved":
                resolved += 1
            elif isinstance(e, Drift):
                drifts += 1
    assert pipe.ring.windows_dropped == 0, "replay overran its ring buffer"
    # Between window ends, a row carries the newest score and state known at its time.
    last = np.maximum.accumulate(np.where(has_score, np.arange(n), -1))
    keep = np.maximum(last, 0)
    result = ReplayResult(
        rows=n, rows_skipped=int(n - good.size), windows=pipe.windows_scored,
        alerts=pipe.alerts, drift_events=drifts, threshold=pipe.threshold,
        score=np.where(last >= 0, score[keep], 0.0).astype(np.float32), alert=alert,
        episode=np.where(last >= 0, episode[keep], 0), resolved=resolved)
    result.state = (result.episode > 0).astype(np.int8)
    if out_path is not None:
        _write(out_path, rec, result, raw)
    return result


def _write(out_path: Path, rec: Recording, result: ReplayResult,
           raw: npt.NDArray[np.float32]) -> None:
    ti = rec.header.index(rec.time_column)
    vi = [rec.header.index(c) for c in rec.columns]
    with out_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", *rec.columns, "score", "alert", "raw_score", "state",
                    "episode"])
        for k, r in enumerate(rec.rows):
            w.writerow([r[ti] if ti < len(r) else "", *(r[i] if i < len(r) else "" for i in vi),
                        f"{result.score[k]:.6f}", int(result.alert[k]),
                        "" if math.isnan(raw[k]) else f"{raw[k]:.6g}", int(result.state[k]),
                        int(result.episode[k])])
