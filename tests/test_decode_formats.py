"""The fast decoders: msgspec structs agree with the generic path, msgpack payloads, f32
binary frames and every way one can be wrong, numpy-free timestamps."""

from __future__ import annotations

import json
import math
import struct
from datetime import datetime, timezone

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.decode import (
    F32_HEADER,
    DecodeError,
    _decode_json,
    _decode_msgpack,
    _seconds,
    _to_seconds,
    decode,
    decoder_for,
)

F = ("a", "b")
NOW = 1_700_000_000.0
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(fn, payload):
    """A comparable result: the readings as plain lists, or the error kind."""
    try:
        ts, values = fn(payload)
    except DecodeError as e:
        return ("error", e.kind)
    if isinstance(ts, np.ndarray):
        return ("frame", ts.tolist(), np.asarray(values, np.float64).tolist())
    return ("reading", ts, values)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=6) | st.sampled_from(["2023-11-14T22:13:21Z", "1700000001"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["ts", "a", "b", "x"]), children, max_size=4),
    max_leaves=16,
)
# Shapes the typed structs accept, so the fast path is exercised, not only its fallback.
numbers = st.integers(-10**6, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
readings = st.fixed_dictionaries(
    {"a": numbers, "b": numbers},
    optional={"ts": numbers | st.none() | st.sampled_from(["2023-11-14T22:13:21Z", "x"])})
frames = st.integers(0, 4).flatmap(lambda n: st.fixed_dictionaries(
    {"a": st.lists(numbers, min_size=n, max_size=n), "b": st.lists(numbers, min_size=n,
                                                                   max_size=n + 1)},
    optional={"ts": st.lists(numbers, min_size=n, max_size=n)}))


@FUZZ
@given(json_values | readings | frames)
def test_typed_json_decoder_gives_what_the_generic_path_gives(obj):
    payload = json.dumps(obj, allow_nan=True).encode()
    fast = decoder_for("json", F)
    assert _outcome(lambda b: fast(b, NOW), payload) == \
        _outcome(lambda b: _decode_json(b, F, NOW), payload)


@FUZZ
@given(json_values | readings | frames)
def test_typed_msgpack_decoder_gives_what_the_generic_path_gives(obj):
    try:
        payload = msgspec.msgpack.encode(obj)
    except OverflowError:  # an integer msgpack cannot carry
        return
    fast = decoder_for("msgpack", F)
    assert _outcome(lambda b: fast(b, NOW), payload) == \
        _outcome(lambda b: _decode_msgpack(b, F, NOW), payload)


def test_a_stream_switching_between_readings_and_frames_decodes_both():
    dec = decoder_for("json", F)
    frame = b'{"ts": [1700000001, 1700000002], "a": [1, 2], "b": [3, 4]}'
    reading = b'{"ts": 1700000003, "a": 5, "b": 6}'
    for _ in range(2):
        ts, cols = dec(frame, NOW)
        assert ts.tolist() == [1700000001.0, 1700000002.0]
        assert cols.tolist() == [[1.0, 2.0], [3.0, 4.0]]
        assert dec(reading, NOW) == (1700000003.0, [5.0, 6.0])


def test_msgpack_shapes():
    enc = msgspec.msgpack.encode
    assert decode(enc({"ts": 1700000001.5, "a": 1, "b": 2.5}), "msgpack", F, NOW) == (
        1700000001.5, [1.0, 2.5])
    assert decode(enc({"a": 1, "b": 2, "unit": "g"}), "msgpack", F, NOW) == (NOW, [1.0, 2.0])
    ts, cols = decode(enc({"ts": [1, 2e3], "a": [1, 2], "b": [3, 4]}), "msgpack", F, NOW)
    assert ts.tolist() == [1.0, 2e3] and cols.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert decode(enc([1, 2]), "msgpack", F, NOW) == (NOW, [1.0, 2.0])
    assert decode(enc(3.5), "msgpack", ["x"], NOW) == (NOW, [3.5])
    # A MessagePack timestamp (extension type -1) is a time like an epoch number.
    when = datetime(2023, 11, 14, 22, 13, 21, tzinfo=timezone.utc)
    assert decode(enc({"ts": when, "a": 1, "b": 2}), "msgpack", F, NOW)[0] == 1700000001.0


@pytest.mark.parametrize(("obj", "kind"), [
    ({"a": math.nan, "b": 1}, "non_finite"),
    ({"a": math.inf, "b": 1}, "non_finite"),
    ({"a": 1e39, "b": 1}, "non_finite"),
    ({"a": [1, math.nan], "b": [1, 2]}, "non_finite"),
    ({"a": 1}, "wrong_fields"),
    ({"a": b"\x01", "b": 1}, "wrong_fields"),
    ({"a": True, "b": 1}, "wrong_fields"),
    ({"a": [1, 2], "b": [1]}, "wrong_fields"),
    ({"ts": "yesterday", "a": 1, "b": 2}, "bad_timestamp"),
    ({"ts": math.nan, "a": 1, "b": 2}, "bad_timestamp"),
    ([1, 2, 3], "wrong_fields"),
])
def test_msgpack_rejections(obj, kind):
    with pytest.raises(DecodeError) as e:
        decode(msgspec.msgpack.encode(obj), "msgpack", F, NOW)
    assert e.value.kind == kind


def test_deeply_nested_msgpack_is_undecodable_not_a_recursion_error():
    for payload in (b"\x91" * 200_000, b"\x81\xa1a" * 100_000):
        with pytest.raises(DecodeError) as e:
            decode(payload, "msgpack", F, NOW)
        assert e.value.kind == "undecodable"


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_msgpack_or_f32_are_decode_errors_or_finite_readings(payload):
    for fmt in ("msgpack", "f32"):
        try:
            ts, values = decode(payload, fmt, F, NOW)
        except DecodeError as e:
            assert e.kind in {"undecodable", "wrong_fields", "non_finite", "bad_timestamp"}
            continue
        assert np.isfinite(np.asarray(values, np.float64)).all()
        assert np.isfinite(np.asarray(ts, np.float64)).all()


@FUZZ
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**19, 10**19))
def test_scalar_timestamps_convert_like_frame_timestamps(t):
    assert _seconds(float(t)) == _to_seconds(np.array([float(t)]))[0]


# -- f32 binary frames -------------------------------------------------------------------


def f32_frame(values, *, t0=1_700_000_000.0, period=0.5, ts=None, version=1, flags=None,
              channels=None):
    v = np.asarray(values, dtype="<f4")
    if flags is None:
        flags = 0 if ts is None else 1
    head = F32_HEADER.pack(version, flags, v.shape[1] if channels is None else channels,
                           t0, period)
    stamps = b"" if ts is None else np.asarray(ts, dtype="<f8").tobytes()
    return head + stamps + v.tobytes()


def test_f32_header_is_the_documented_16_bytes():
    assert F32_HEADER.size == 16 == struct.calcsize("<BBHdf")


def test_f32_frame_with_a_period():
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    ts, cols = decode(f32_frame(values, t0=1.7e9, period=0.25), "f32", "xyz", NOW)
    assert ts.tolist() == [1.7e9, 1.7e9 + 0.25, 1.7e9 + 0.5, 1.7e9 + 0.75]
    assert cols.shape == (3, 4) and cols.dtype == np.float32
    np.testing.assert_array_equal(cols.T, values)


def test_f32_frame_with_per_sample_timestamps_ignores_t0_and_period():
    values = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=np.float32)
    stamps = [1_700_000_000.125, 1_700_000_007.5]
    ts, cols = decode(f32_frame(values, ts=stamps, t0=math.nan, period=math.nan), "f32", F, NOW)
    assert ts.tolist() == stamps
    np.testing.assert_array_equal(cols.T, values)


GOOD = np.ones((3, 2), dtype=np.float32)


@pytest.mark.parametrize(("payload", "kind", "says"), [
    (f32_frame(GOOD)[:10], "undecodable", "truncated"),
    (f32_frame(GOOD)[:-3], "undecodable", "truncated"),
    (f32_frame(GOOD, ts=[1.7e9] * 3)[:-4], "undecodable", "truncated"),
    (f32_frame(GOOD)[:16], "undecodable", "empty frame"),
    (f32_frame(GOOD, version=2), "undecodable", "unsupported frame version 2"),
    (f32_frame(GOOD, version=0), "undecodable", "unsupported frame version 0"),
    (f32_frame(GOOD, flags=0x02), "undecodable", "unknown frame flags 0x02"),
    (f32_frame(GOOD, flags=0x81), "undecodable", "unknown frame flags 0x81"),
    (f32_frame(np.ones((2, 3))), "wrong_fields", "3 channels"),
    (f32_frame(GOOD, channels=1), "wrong_fields", "1 channels"),
    (f32_frame(GOOD, period=0.0), "bad_timestamp", "period"),
    (f32_frame(GOOD, period=-1.0), "bad_timestamp", "period"),
    (f32_frame(GOOD, period=math.nan), "bad_timestamp", "period"),
    (f32_frame(GOOD, period=math.inf), "bad_timestamp", "period"),
    (f32_frame(GOOD, t0=math.nan), "bad_timestamp", "between 1970 and 2100"),
    (f32_frame(GOOD, t0=-5.0), "bad_timestamp", "between 1970 and 2100"),
    (f32_frame(GOOD, t0=4.1e9, period=1e7), "bad_timestamp", "between 1970 and 2100"),
    (f32_frame(GOOD, ts=[1.7e9, math.nan, 1.7e9]), "bad_timestamp", "between 1970 and 2100"),
    (f32_frame(GOOD, ts=[1.7e9, 1.7e12, 1.7e9]), "bad_timestamp", "between 1970 and 2100"),
    (f32_frame([[1.0, np.nan], [1.0, 1.0]]), "non_finite", "NaN"),
    (f32_frame([[1.0, 1.0], [-np.inf, 1.0]]), "non_finite", "infinity"),
    (f32_frame([[1.0, 1.0]], ts=[1.7e9])[:16] + b"\x00" * 4, "undecodable", "truncated"),
])
def test_f32_rejections_name_the_problem(payload, kind, says):
    with pytest.raises(DecodeError) as e:
        decode(payload, "f32", F, NOW)
    assert e.value.kind == kind
    assert says in str(e.value)
