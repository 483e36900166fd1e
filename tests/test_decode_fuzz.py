"""Property/fuzz tests of the payload decoders (hypothesis, bounded time): whatever arrives,
``decode`` returns finite float readings of the right shape or raises DecodeError; nothing
else escapes into paho's network thread."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.decode import TS_MAX, DecodeError, decode

FIELDS = ["a", "b", "c"]
NOW = 1_700_000_000.0
# Bounded: the suite stays fast; CI can raise it with HYPOTHESIS_PROFILE if wanted.
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.sampled_from(["ts", "a", "b", "c", "x"]), children, max_size=5),
    max_leaves=30,
)


def _check(payload: bytes, fmt: str, fields: list[str]) -> None:
    try:
        ts, values = decode(payload, fmt, fields, NOW)
    except DecodeError as e:
        assert e.kind in {"undecodable", "wrong_fields", "non_finite", "bad_timestamp"}
        return
    v = np.asarray(values, dtype=np.float64)
    t = np.asarray(ts, dtype=np.float64)
    assert np.isfinite(v).all() and np.isfinite(t).all()
    assert ((t >= 0) & (t <= TS_MAX)).all()
    if isinstance(ts, np.ndarray):
        assert v.shape == (len(fields), len(ts))
    else:
        assert v.shape == (len(fields),) and math.isfinite(ts)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["json", "csv", "float"]))
def test_random_bytes_never_escape_as_other_errors(payload: bytes, fmt: str) -> None:
    _check(payload, fmt, FIELDS if fmt != "float" else ["a"])


@FUZZ
@given(json_values)
def test_json_shaped_input(obj: object) -> None:
    payload = json.dumps(obj, allow_nan=True).encode()
    _check(payload, "json", FIELDS)
    _check(payload, "json", ["a"])


@FUZZ
@given(st.lists(st.lists(st.one_of(st.floats(allow_nan=True), st.text(max_size=6),
                                   st.integers()), min_size=1, max_size=5),
                min_size=1, max_size=5))
def test_csv_shaped_input(rows: list[list[object]]) -> None:
    payload = "\n".join(",".join(map(str, r)) for r in rows).encode()
    _check(payload, "csv", FIELDS)


def test_deep_nesting_is_undecodable_not_a_recursion_error() -> None:
    try:
        decode(b"[" * 200_000 + b"]" * 200_000, "json", FIELDS, NOW)
    except DecodeError as e:
        assert e.kind in {"undecodable", "wrong_fields"}
