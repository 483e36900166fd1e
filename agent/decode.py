"""Sensor payload decoders: bytes in, one reading or a frame of readings out.

Formats (see README, "Payloads"):

* ``json``: ``{"ts": 1700000000.0, "<field>": 1.5, ...}`` for one reading, or a
  frame ``{"ts": [...], "<field>": [...], ...}`` with one list per field. A bare
  JSON number is accepted for single-channel streams and a JSON list of numbers
  in ``fields`` order for any stream. Keys that are not fields are ignored.
* ``csv``: one line per reading, values in ``fields`` order with an optional
  leading timestamp; several lines make a frame.
* ``float``: a bare number, for single-channel streams.

A missing ``ts`` means arrival time. Numeric timestamps are epoch seconds, or
milliseconds, microseconds or nanoseconds told apart by magnitude (above 1e11,
1e14, 1e17); anything outside 1970..2100 after that is refused.
Everything that is not a finite number is rejected with a :class:`DecodeError`
whose ``kind`` is what the agent counts.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["BadInputLog", "DecodeError", "Frame", "LogLimiter", "Reading", "decode"]

log = logging.getLogger(__name__)

# Distinct (kind, topic) pairs remembered for bad-input logging; beyond this,
# new topics are counted under "*" so a misbehaving sensor cannot grow memory.
BAD_INPUT_KEYS_MAX = 1000


# Per-message log lines (bad input, refused manifests, callback errors) share a
# token bucket: a burst of LOG_BURST lines, then one every LOG_REFILL_S, each
# saying how many were suppressed since. Anyone who can publish to a topic we
# read must not be able to flood the journal.
LOG_BURST = 10
LOG_REFILL_S = 6.0
# Keys whose first occurrence got a full traceback; beyond this, only counts.
LOG_KEYS_MAX = 1000


class LogLimiter:
    """A token bucket for per-message log lines; what it drops is counted, not lost."""

    def __init__(self, logger: logging.Logger, *, burst: int = LOG_BURST,
                 refill_s: float = LOG_REFILL_S,
                 monotonic: Any = time.monotonic) -> None:
        self._log = logger
        self._burst = burst
        self._refill_s = refill_s
        self._mono = monotonic
        self._tokens = float(burst)
        self._at = monotonic()
        self._lock = threading.Lock()
        self._traced: set[str] = set()
        self.suppressed = 0
        self.lines = 0

    def _take(self) -> int | None:
        """Suppressed-count to report if a line may be written now, else None."""
        with self._lock:
            now = self._mono()
            self._tokens = min(float(self._burst), self._tokens + (now - self._at) / self._refill_s)
            self._at = now
            if self._tokens < 1.0:
                self.suppressed += 1
                return None
            self._tokens -= 1.0
            n, self.suppressed = self.suppressed, 0
            self.lines += 1
            return n

    def log(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log ``msg % args`` unless over the rate; returns whether it was written."""
        n = self._take()
        if n is None:
            return False
        if n:
            msg += " [%d similar line(s) suppressed]"
            args = (*args, n)
        self._log.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def exception(self, key: str, msg: str, *args: Any) -> bool:
        """An ERROR line; the traceback only the first time ``key`` is seen."""
        with self._lock:
            first = key not in self._traced and len(self._traced) < LOG_KEYS_MAX
            if first:
                self._traced.add(key)
        if not first:
            exc = sys.exc_info()[1]
            return self.log(logging.ERROR, msg + " (%s: %.200s)", *args,
                            type(exc).__name__, exc)
        return self.log(logging.ERROR, msg, *args, exc_info=True)


class BadInputLog:
    """Counts rejected input by kind and topic; logs the first of each pair, rate-limited."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.limiter = LogLimiter(log)

    def _count(self, kind: str, topic: str, n: int) -> int:
        with self._lock:
            key = (kind, topic)
            if key not in self.counts and len(self.counts) >= BAD_INPUT_KEYS_MAX:
                key = (kind, "*")
            before = self.counts.get(key, 0)
            self.counts[key] = before + n
        return before

    def add(self, kind: str, topic: str, detail: str) -> None:
        """One payload dropped."""
        if self._count(kind, topic, 1) == 0:
            self.limiter.warning("dropped %s input on %s: %s (further ones on this topic are "
                                 "only counted)", kind, topic, detail)

    def note(self, kind: str, topic: str, detail: str, n: int = 1) -> None:
        """``n`` samples accepted with a correction (counted like bad input, not dropped)."""
        if self._count(kind, topic, n) == 0:
            self.limiter.warning("%s on %s: %s (further ones on this topic are only counted)",
                                 kind, topic, detail)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for (kind, _), n in self.counts.items():
                out[kind] = out.get(kind, 0) + n
        return out


_MS_THRESHOLD = 1e11
# 2100-01-01: beyond it a timestamp is a unit mistake, and one far-future alert
# time would hold every later alert in its cooldown.
TS_MAX = 4_102_444_800.0
_NUMBER_TYPES = frozenset((int, float))
# The ring buffers hold float32: anything larger would become infinity there.
FLOAT32_MAX = float(np.finfo(np.float32).max)

Reading = tuple[float, list[float]]
# timestamps (n,), values (channels, n)
Frame = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]

ErrorKind = Literal["undecodable", "wrong_fields", "non_finite", "bad_timestamp"]


class DecodeError(ValueError):
    """A payload that cannot become readings; ``kind`` names the counter it feeds."""

    def __init__(self, kind: ErrorKind, detail: str) -> None:
        self.kind = kind
        super().__init__(detail)


def _number(v: Any, what: str) -> float:
    # bool is an int subclass in Python; true/false are not readings.
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise DecodeError("wrong_fields", f"{what} is not a number: {v!r:.40}")
    try:
        f = float(v)
    except OverflowError:
        raise DecodeError("non_finite", f"{what} is beyond float range") from None
    return _in_range(f, what)


def _in_range(f: float, what: str) -> float:
    """``f`` if the float32 ring buffers can hold it (finite, within float32)."""
    if not abs(f) <= FLOAT32_MAX:  # also catches NaN
        raise DecodeError("non_finite", f"{what} is {f}")
    return f


def _timestamp(v: Any, now: float) -> float:
    if v is None:
        return now
    if isinstance(v, str):
        try:
            iso = datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
        else:
            if not 0.0 <= iso <= TS_MAX:
                raise DecodeError("bad_timestamp", f"ts {v!r:.40} is not between 1970 and 2100")
            return iso
        try:
            v = float(v)
        except ValueError:
            raise DecodeError("bad_timestamp", f"ts is not a time: {v!r:.40}") from None
    try:
        t = float(v) if not isinstance(v, bool) and isinstance(v, int | float) else math.nan
    except OverflowError:
        t = math.nan
    if not math.isfinite(t):
        raise DecodeError("bad_timestamp", f"ts is not a time: {v!r:.40}")
    s = float(_to_seconds(np.float64(t)))
    if not 0.0 <= s <= TS_MAX:
        raise DecodeError("bad_timestamp", f"ts {v!r:.40} is not between 1970 and 2100")
    return s


def _to_seconds(t: Any) -> Any:
    """Epoch seconds from seconds, milliseconds, microseconds or nanoseconds, by magnitude."""
    a = np.abs(t)
    return np.where(a > 1e17, t / 1e9, np.where(a > 1e14, t / 1e6,
                                                np.where(a > _MS_THRESHOLD, t / 1e3, t)))


def _decode_json(payload: bytes | bytearray, fields: Sequence[str], now: float) -> Reading | Frame:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise DecodeError("undecodable", f"not JSON: {e}") from None
    if isinstance(obj, dict):
        try:
            first = obj[fields[0]]
        except KeyError:
            raise DecodeError("wrong_fields", f"missing field {fields[0]!r}") from None
        if isinstance(first, list):
            return _json_frame(obj, fields, now)
        values = []
        for f in fields:
            if f not in obj:
                raise DecodeError("wrong_fields", f"missing field {f!r}")
            values.append(_number(obj[f], f))
        return _timestamp(obj.get("ts"), now), values
    if isinstance(obj, list):
        if len(obj) != len(fields):
            raise DecodeError("wrong_fields", f"{len(obj)} values for {len(fields)} fields")
        return now, [_number(v, f) for v, f in zip(obj, fields, strict=True)]
    if len(fields) == 1:
        return now, [_number(obj, fields[0])]
    raise DecodeError("wrong_fields", f"a bare {type(obj).__name__} for {len(fields)} fields")


def _json_frame(obj: dict[str, Any], fields: Sequence[str], now: float) -> Frame:
    columns: list[list[float]] = []
    n = -1
    for f in fields:
        col = obj.get(f)
        if not isinstance(col, list):
            raise DecodeError("wrong_fields", f"frame field {f!r} is not a list")
        if n >= 0 and len(col) != n:
            raise DecodeError("wrong_fields", f"frame field {f!r} has {len(col)} values, not {n}")
        n = len(col)
        # Type check in C (map/set) instead of a Python call per value: frames
        # are where the samples/s are.
        if not _NUMBER_TYPES.issuperset(map(type, col)):
            bad = next(v for v in col if type(v) not in _NUMBER_TYPES)
            raise DecodeError("wrong_fields", f"{f} is not a number: {bad!r:.40}")
        columns.append(col)
    try:
        values = np.array(columns, dtype=np.float64).reshape(len(fields), n)
    except OverflowError:  # an integer beyond float range
        raise DecodeError("non_finite", "frame holds a value beyond float range") from None
    if n and not (np.abs(values).max() <= FLOAT32_MAX):  # also false for NaN
        raise DecodeError("non_finite", "frame holds NaN, infinity or a value beyond float32")
    raw_ts = obj.get("ts")
    if raw_ts is None:
        ts = np.full(n, now)
    elif isinstance(raw_ts, list):
        if len(raw_ts) != n:
            raise DecodeError("wrong_fields", f"frame has {len(raw_ts)} timestamps for {n} values")
        if _NUMBER_TYPES.issuperset(map(type, raw_ts)):
            try:
                ts = np.array(raw_ts, dtype=np.float64)
            except OverflowError:
                raise DecodeError("bad_timestamp", "ts beyond float range") from None
            if n and not np.isfinite(ts).all():
                raise DecodeError("bad_timestamp", "ts is not finite")
            ts = _to_seconds(ts)
            if n and not ((ts >= 0.0) & (ts <= TS_MAX)).all():
                raise DecodeError("bad_timestamp", "a frame ts is not between 1970 and 2100")
        else:
            ts = np.array([_timestamp(t, now) for t in raw_ts], dtype=np.float64)
    else:
        raise DecodeError("bad_timestamp", "a frame's ts must be a list")
    return ts, values


def _decode_csv(payload: bytes | bytearray, fields: Sequence[str], now: float) -> Reading | Frame:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError("undecodable", f"not UTF-8: {e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DecodeError("undecodable", "empty payload")
    n = len(fields)
    readings: list[Reading] = []
    for line in lines:
        parts = line.split(",")
        if len(parts) == n + 1:
            ts = _timestamp(parts[0].strip(), now)
            parts = parts[1:]
        elif len(parts) == n:
            ts = now
        else:
            raise DecodeError("wrong_fields", f"{len(parts)} columns for {n} fields")
        values = []
        for f, p in zip(fields, parts, strict=True):
            try:
                v = float(p)
            except ValueError:
                raise DecodeError("wrong_fields", f"{f} is not a number: {p!r:.40}") from None
            values.append(_in_range(v, f))
        readings.append((ts, values))
    if len(readings) == 1:
        return readings[0]
    ts_arr = np.array([r[0] for r in readings], dtype=np.float64)
    return ts_arr, np.array([r[1] for r in readings], dtype=np.float64).T


def _decode_float(payload: bytes | bytearray, fields: Sequence[str], now: float) -> Reading:
    try:
        v = float(payload)
    except ValueError:
        raise DecodeError("undecodable", f"not a number: {payload[:40]!r}") from None
    return now, [_in_range(v, fields[0])]


_DECODERS = {"json": _decode_json, "csv": _decode_csv, "float": _decode_float}


def decode(
    payload: bytes | bytearray, fmt: str, fields: Sequence[str], now: float
) -> Reading | Frame:
    """Decode one MQTT payload into a reading ``(ts, values)`` or a frame ``(ts[], columns)``.

    A frame is told apart from a reading by its timestamps being an array.
    """
    return _DECODERS[fmt](payload, fields, now)
