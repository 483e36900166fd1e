"""Sensor payload decoders: bytes in, one reading or a frame of readings out.

Formats (see README, "Payloads"):

* ``json``: ``{"ts": 1700000000.0, "<field>": 1.5, ...}`` for one reading, or a
  frame ``{"ts": [...], "<field>": [...], ...}`` with one list per field. A bare
  JSON number is accepted for single-channel streams and a JSON list of numbers
  in ``fields`` order for any stream. Keys that are not fields are ignored.
* ``csv``: one line per reading, values in ``fields`` order with an optional
  leading timestamp; several lines make a frame.
* ``float``: a bare number, for single-channel streams.
* ``msgpack``: the same shapes as ``json`` (a map per reading or per frame, a
  list of numbers, a bare number), MessagePack-encoded.
* ``f32``: a binary frame, a 16-byte header and little-endian float32 samples
  (:func:`_decode_f32` and README, "Binary frames"); no per-sample Python.

JSON and MessagePack are decoded by msgspec structs compiled once per stream
for its fields (types checked in C). Whatever they refuse goes through the
generic path (stdlib ``json`` for JSON), which accepts exactly what it always
did and names the problem; so the fast path changes speed, never results.

A missing ``ts`` means arrival time. Numeric timestamps are epoch seconds, or
milliseconds, microseconds or nanoseconds told apart by magnitude (above 1e11,
1e14, 1e17); anything outside 1970..2100 after that is refused.
Everything that is not a finite number is rejected with a :class:`DecodeError`
whose ``kind`` is what the agent counts.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = ["F32_HEADER", "BadInputLog", "DecodeError", "Decoder", "Frame", "LogLimiter",
           "Reading", "decode", "decoder_for"]

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
# timestamps (n,), values (channels, n): float64 from text formats, float32 from f32 frames
Frame = tuple[npt.NDArray[np.float64], npt.NDArray[np.floating[Any]]]
Decoder = Callable[[bytes | bytearray, float], Reading | Frame]

ErrorKind = Literal["undecodable", "wrong_fields", "non_finite", "bad_timestamp"]

# The f32 frame header (README, "Binary frames"): version u8, flags u8, channels u16,
# t0 f64 (unix seconds of the first sample), period f32 (seconds between samples).
F32_HEADER = struct.Struct("<BBHdf")
F32_VERSION = 1
F32_FLAG_TIMESTAMPS = 0x01
_F32_VALUES = np.dtype("<f4")
_F64_TIMES = np.dtype("<f8")


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


def _check_in_range(values: list[float], fields: Sequence[str]) -> None:
    """Raise unless every value fits float32; one sum in C for the common case."""
    # A sum within float32 means every term is; NaN and infinity make it fail. A sum
    # beyond it may still be all valid terms, so only then look at each one.
    if not sum(map(abs, values)) <= FLOAT32_MAX:
        for v, f in zip(values, fields, strict=True):
            _in_range(v, f)


def _timestamp(v: Any, now: float) -> float:
    if v is None:
        return now
    if isinstance(v, datetime):  # a MessagePack timestamp
        return _check_seconds(v.timestamp(), v)
    if isinstance(v, str):
        try:
            iso = datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
        else:
            return _check_seconds(iso, v)
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
    return _check_seconds(_seconds(t), v)


def _check_seconds(s: float, raw: Any) -> float:
    if not 0.0 <= s <= TS_MAX:
        raise DecodeError("bad_timestamp", f"ts {raw!r:.40} is not between 1970 and 2100")
    return s


def _seconds(t: float) -> float:
    """Epoch seconds from seconds, milliseconds, microseconds or nanoseconds, by magnitude.

    Plain floats: this runs once per message, and numpy's scalar machinery (three
    nested ``np.where`` on one value) cost 4-5 us, more than parsing the JSON.
    """
    a = abs(t)
    if a > 1e17:
        return t / 1e9
    if a > 1e14:
        return t / 1e6
    if a > _MS_THRESHOLD:
        return t / 1e3
    return t


def _to_seconds(t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """:func:`_seconds` for a frame's timestamps, vectorised."""
    a = np.abs(t)
    out: npt.NDArray[np.float64] = np.where(
        a > 1e17, t / 1e9, np.where(a > 1e14, t / 1e6, np.where(a > _MS_THRESHOLD, t / 1e3, t)))
    return out


# -- JSON and MessagePack: the generic path -----------------------------------------------


def _from_object(obj: Any, fields: Sequence[str], now: float) -> Reading | Frame:
    """Readings from a decoded JSON/MessagePack value: the reference for both formats."""
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


def _decode_json(payload: bytes | bytearray, fields: Sequence[str], now: float) -> Reading | Frame:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise DecodeError("undecodable", f"not JSON: {e}") from None
    return _from_object(obj, fields, now)


def _decode_msgpack(payload: bytes | bytearray, fields: Sequence[str],
                    now: float) -> Reading | Frame:
    try:
        obj = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError) as e:
        raise DecodeError("undecodable", f"not MessagePack: {e}") from None
    return _from_object(obj, fields, now)


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
    return _frame(columns, obj.get("ts"), n, now)


def _frame(columns: list[list[float]], raw_ts: Any, n: int, now: float) -> Frame:
    """A frame from ``columns`` (one list of numbers per field, all ``n`` long) and its ts."""
    try:
        values = np.array(columns, dtype=np.float64).reshape(len(columns), n)
    except OverflowError:  # an integer beyond float range
        raise DecodeError("non_finite", "frame holds a value beyond float range") from None
    if n and not (np.abs(values).max() <= FLOAT32_MAX):  # also false for NaN
        raise DecodeError("non_finite", "frame holds NaN, infinity or a value beyond float32")
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


# -- JSON and MessagePack: typed structs ---------------------------------------------------


class _Typed:
    """A stream's msgspec decoders: one struct for a reading, one for a frame.

    The structs check what is cheap to check in C (a number per field, a list
    per frame field); values are then range-checked here. A payload either
    struct refuses goes to ``fallback``, the generic path, so an error is named
    exactly as before and nothing the generic path accepts is lost.
    """

    def __init__(self, fields: Sequence[str], fmt: str,
                 fallback: Callable[[bytes | bytearray, Sequence[str], float],
                                    Reading | Frame]) -> None:
        self.fields = tuple(fields)
        self._fallback = fallback
        attrs = [f"f{i}" for i in range(len(fields))]
        rename = dict(zip(attrs, fields, strict=True))
        reading = msgspec.defstruct(
            "Reading", [*((a, float) for a in attrs), ("ts", float | str | None, None)],
            rename=rename)
        frame = msgspec.defstruct(
            "Frame", [*((a, list[float]) for a in attrs), ("ts", list[float] | None, None)],
            rename=rename)
        module = msgspec.json if fmt == "json" else msgspec.msgpack
        self._reading = module.Decoder(reading)
        self._frame = module.Decoder(frame)
        self._frames_first = False  # which struct to try first: what the last payload was

    def __call__(self, payload: bytes | bytearray, now: float) -> Reading | Frame:
        out: Reading | Frame | None
        if self._frames_first:
            out = self._as_frame(payload, now)
            if out is None:
                out = self._as_reading(payload, now)
                self._frames_first = out is None
        else:
            out = self._as_reading(payload, now)
            if out is None:
                out = self._as_frame(payload, now)
                self._frames_first = out is not None
        return self._fallback(payload, self.fields, now) if out is None else out

    def _as_reading(self, payload: bytes | bytearray, now: float) -> Reading | None:
        try:
            r = self._reading.decode(payload)
        except msgspec.DecodeError:  # ValidationError included
            return None
        *values, ts = msgspec.structs.astuple(r)
        _check_in_range(values, self.fields)  # before the timestamp, as the generic path does
        return _timestamp(ts, now), values

    def _as_frame(self, payload: bytes | bytearray, now: float) -> Frame | None:
        try:
            r = self._frame.decode(payload)
        except msgspec.DecodeError:
            return None
        *columns, ts = msgspec.structs.astuple(r)
        n = len(columns[0])
        for f, col in zip(self.fields, columns, strict=True):
            if len(col) != n:
                raise DecodeError("wrong_fields", f"frame field {f!r} has {len(col)} values, "
                                  f"not {n}")
        return _frame(columns, ts, n, now)


# -- CSV, float ------------------------------------------------------------------------


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


# -- f32 binary frames ---------------------------------------------------------------------


def _decode_f32(payload: bytes | bytearray, fields: Sequence[str], now: float) -> Frame:
    """A binary frame: header, then (optional float64 timestamps and) float32 samples.

    Header ``<BBHdf``: version (1), flags (bit 0: per-sample timestamps follow
    the header), channels (= the stream's fields, in order), t0 (unix seconds
    of the first sample) and period (seconds between samples, used without
    per-sample timestamps). The samples are sample-major: row i holds sample
    i's channels. Two ``np.frombuffer`` views; nothing per sample in Python.
    """
    size = len(payload)
    if size < F32_HEADER.size:
        raise DecodeError("undecodable", f"truncated frame: {size} bytes, the header alone is "
                          f"{F32_HEADER.size}")
    version, flags, channels, t0, period = F32_HEADER.unpack_from(payload)
    if version != F32_VERSION:
        raise DecodeError("undecodable", f"unsupported frame version {version}")
    if flags & ~F32_FLAG_TIMESTAMPS:
        raise DecodeError("undecodable", f"unknown frame flags 0x{flags:02x} (only bit 0 is "
                          "defined)")
    if channels != len(fields):
        raise DecodeError("wrong_fields", f"frame has {channels} channels, the stream has "
                          f"{len(fields)} fields")
    stamped = bool(flags & F32_FLAG_TIMESTAMPS)
    body = size - F32_HEADER.size
    per_sample = 4 * channels + (8 if stamped else 0)
    if body == 0:
        raise DecodeError("undecodable", "empty frame: a header and no samples")
    if body % per_sample:
        raise DecodeError("undecodable", f"truncated frame: a body of {body} bytes is not a "
                          f"whole number of {per_sample}-byte samples")
    n = body // per_sample
    offset = F32_HEADER.size
    if stamped:
        ts = np.frombuffer(payload, _F64_TIMES, n, offset).astype(np.float64)  # native order
        offset += 8 * n
        if not ((ts >= 0.0) & (ts <= TS_MAX)).all():  # also false for NaN
            raise DecodeError("bad_timestamp", "a frame timestamp is not between 1970 and 2100")
    else:
        ts = _periodic(t0, period, n)
    values = np.frombuffer(payload, _F32_VALUES, n * channels, offset)
    # np.isfinite(values).all() without all()'s Python wrapper
    if not np.logical_and.reduce(np.isfinite(values)):
        raise DecodeError("non_finite", "frame holds NaN or infinity")
    return ts, values.reshape(n, channels).T


def _periodic(t0: float, period: float, n: int) -> npt.NDArray[np.float64]:
    """``n`` timestamps from ``t0`` every ``period`` seconds, all within 1970..2100."""
    if not (period > 0.0 and math.isfinite(period)):
        raise DecodeError("bad_timestamp", f"frame period {period} is not a positive number "
                          "of seconds")
    last = t0 + (n - 1) * period
    if not (0.0 <= t0 <= TS_MAX and last <= TS_MAX):  # also false for NaN
        raise DecodeError("bad_timestamp", f"frame t0 {t0} (last sample {last}) is not "
                          "between 1970 and 2100")
    return t0 + np.arange(n, dtype=np.float64) * period


_GENERIC = {"json": _decode_json, "msgpack": _decode_msgpack, "csv": _decode_csv,
            "float": _decode_float, "f32": _decode_f32}


@functools.lru_cache(maxsize=256)
def decoder_for(fmt: str, fields: tuple[str, ...]) -> Decoder:
    """The decoder of a stream's format and fields, built once (``payload, now -> readings``)."""
    generic = _GENERIC[fmt]
    if fmt in ("json", "msgpack") and "ts" not in fields:
        return _Typed(fields, fmt, generic)

    def bound(payload: bytes | bytearray, now: float) -> Reading | Frame:
        return generic(payload, fields, now)

    return bound


def decode(
    payload: bytes | bytearray, fmt: str, fields: Sequence[str], now: float
) -> Reading | Frame:
    """Decode one MQTT payload into a reading ``(ts, values)`` or a frame ``(ts[], columns)``.

    A frame is told apart from a reading by its timestamps being an array.
    """
    return decoder_for(fmt, tuple(fields))(payload, now)
