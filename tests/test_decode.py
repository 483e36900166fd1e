import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode import DecodeError, decode

F = ["a", "b"]
NOW = 1_700_000_000.0


def test_json_reading_with_and_without_ts():
    assert decode(b'{"ts": 1700000001.5, "a": 1, "b": 2.5}', "json", F, NOW) == (
        1700000001.5, [1.0, 2.5])
    assert decode(b'{"a": 1, "b": 2, "unit": "g"}', "json", F, NOW) == (NOW, [1.0, 2.0])


def test_json_ts_in_milliseconds_and_iso():
    ts, _ = decode(b'{"ts": 1700000001500, "a": 1, "b": 2}', "json", F, NOW)
    assert ts == pytest.approx(1700000001.5)
    ts, _ = decode(b'{"ts": "2023-11-14T22:13:21Z", "a": 1, "b": 2}', "json", F, NOW)
    assert ts == pytest.approx(1700000001.0)


def test_json_frame():
    ts, cols = decode(b'{"ts": [1, 2, 3e12], "a": [1, 2, 3], "b": [4, 5, 6]}', "json", F, NOW)
    assert ts.tolist() == [1.0, 2.0, 3e9]
    assert cols.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    ts, _ = decode(b'{"a": [1, 2], "b": [4, 5]}', "json", F, NOW)
    assert ts.tolist() == [NOW, NOW]
    ts, _ = decode(b'{"ts": ["2023-11-14T22:13:21Z"], "a": [1], "b": [4]}', "json", F, NOW)
    assert ts.tolist() == [1700000001.0]


def test_json_list_and_bare_number():
    assert decode(b"[1, 2]", "json", F, NOW) == (NOW, [1.0, 2.0])
    assert decode(b"3.5", "json", ["x"], NOW) == (NOW, [3.5])


@pytest.mark.parametrize(("payload", "kind"), [
    (b"{not json", "undecodable"),
    (b"\xff\xfe", "undecodable"),
    (b'{"a": 1}', "wrong_fields"),
    (b'{"a": 1, "b": "x"}', "wrong_fields"),
    (b'{"a": 1, "b": true}', "wrong_fields"),
    (b'{"a": NaN, "b": 1}', "non_finite"),
    (b'{"a": Infinity, "b": 1}', "non_finite"),
    (b'{"a": 1e999, "b": 1}', "non_finite"),
    (b'{"ts": "yesterday", "a": 1, "b": 2}', "bad_timestamp"),
    (b'{"ts": [1], "a": [1, 2], "b": [3, 4]}', "wrong_fields"),
    (b'{"a": [1, 2], "b": [3]}', "wrong_fields"),
    (b'{"a": [1, 2], "b": 3}', "wrong_fields"),
    (b"[1, 2, 3]", "wrong_fields"),
    (b"1.5", "wrong_fields"),
    (b'{"a": 1e39, "b": 1}', "non_finite"),
    (b'{"a": [1, 1e39], "b": [1, 2]}', "non_finite"),
    (b'{"a": [1, NaN], "b": [1, 2]}', "non_finite"),
    (b'{"a": [1, true], "b": [1, 2]}', "wrong_fields"),
    (b'{"a": [1, "2"], "b": [1, 2]}', "wrong_fields"),
    (b'{"a": 1' + b"0" * 400 + b', "b": 1}', "non_finite"),
    (b'{"ts": 1' + b"0" * 400 + b', "a": 1, "b": 1}', "bad_timestamp"),
    (b'{"ts": [NaN], "a": [1], "b": [1]}', "bad_timestamp"),
])
def test_json_rejections(payload, kind):
    with pytest.raises(DecodeError) as e:
        decode(payload, "json", F, NOW)
    assert e.value.kind == kind


def test_csv_lines_with_optional_timestamp_and_frames():
    assert decode(b"1.5,2.5", "csv", F, NOW) == (NOW, [1.5, 2.5])
    assert decode(b"1700000001,1.5,2.5\n", "csv", F, NOW) == (1700000001.0, [1.5, 2.5])
    ts, cols = decode(b"1,1,2\n2,3,4\n", "csv", F, NOW)
    assert ts.tolist() == [1.0, 2.0]
    assert cols.tolist() == [[1.0, 3.0], [2.0, 4.0]]


@pytest.mark.parametrize(("payload", "kind"), [
    (b"1,2,3,4", "wrong_fields"),
    (b"1", "wrong_fields"),
    (b"1,x", "wrong_fields"),
    (b"nan,1", "non_finite"),
    (b"", "undecodable"),
    (b"\xff,1", "undecodable"),
])
def test_csv_rejections(payload, kind):
    with pytest.raises(DecodeError) as e:
        decode(payload, "csv", F, NOW)
    assert e.value.kind == kind


def test_float_payloads():
    assert decode(b" 2.25\n", "float", ["x"], NOW) == (NOW, [2.25])
    for bad, kind in [(b"nan", "non_finite"), (b"inf", "non_finite"), (b"abc", "undecodable"),
                      (b"", "undecodable"), (b"\xff", "undecodable")]:
        with pytest.raises(DecodeError) as e:
            decode(bad, "float", ["x"], NOW)
        assert e.value.kind == kind


def _check_result(result, n_fields):
    ts, values = result
    if isinstance(ts, np.ndarray):
        assert values.shape == (n_fields, len(ts))
        assert np.isfinite(values.astype(np.float32)).all()
        assert np.isfinite(ts).all()
    else:
        assert math.isfinite(ts)
        assert len(values) == n_fields
        assert all(isinstance(v, float) and math.isfinite(v) for v in values)
        assert np.isfinite(np.asarray(values, np.float32)).all()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["ts", "a", "b", "c"]), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["json", "csv", "float"]))
def test_fuzz_bytes_never_crash(payload, fmt):
    fields = ["a"] if fmt == "float" else F
    try:
        _check_result(decode(payload, fmt, fields, NOW), len(fields))
    except DecodeError:
        pass


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_fuzz_json_structures_never_crash(obj):
    payload = json.dumps(obj).encode()
    try:
        _check_result(decode(payload, "json", F, NOW), len(F))
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.text("0123456789.-e,naif ", max_size=8), max_size=4), max_size=4))
def test_fuzz_csv_lines_never_crash(rows):
    payload = "\n".join(",".join(r) for r in rows).encode()
    try:
        _check_result(decode(payload, "csv", F, NOW), len(F))
    except DecodeError:
        pass
