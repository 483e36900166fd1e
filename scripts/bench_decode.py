"""Microseconds per message of the sensor decoders, and msgspec against orjson for JSON.

    .venv/bin/python scripts/bench_decode.py [--repeat 7] [--number 20000]

The JSON payload is the one `scripts/bench.py` publishes: one reading of the
8-field SKAB pump stream. Each line is the best of `--repeat` runs of `--number`
calls, in this process, so the ratios compare like with like on a noisy machine.
orjson is not a dependency of the agent: install it into the venv to see its
line (`.venv/bin/pip install orjson`); without it that line says so.

What it prints, per message:
- the parse alone (stdlib json, orjson, msgspec untyped, msgspec typed struct);
- the whole decode (parse, field and range checks, timestamp): the generic path
  on stdlib json (what every payload went through before), the same checks on
  orjson's and msgspec's untyped output, and the typed msgspec decoder the agent
  uses (`agent.decode.decoder_for`);
- a frame of 32 samples as JSON, MessagePack and f32, per message and per sample.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from agent.decode import F32_HEADER, _decode_json, _from_object, decoder_for

FIELDS = ("Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS")
ROW = [0.21, 0.27, 2.4, 0.11, 89.5, 28.4, 228.6, 125.1]
T0 = 1_700_000_000.0
NOW = 1_800_000_000.0
FRAME = 32


def reading_json() -> bytes:
    return json.dumps({"ts": T0 + 17, **dict(zip(FIELDS, ROW, strict=True))}).encode()


def frame_obj() -> dict[str, Any]:
    return {"ts": [T0 + k for k in range(FRAME)],
            **{f: [v + k * 1e-3 for k in range(FRAME)] for f, v in zip(FIELDS, ROW, strict=True)}}


def frame_f32() -> bytes:
    values = np.array([[v + k * 1e-3 for v in ROW] for k in range(FRAME)], dtype="<f4")
    return F32_HEADER.pack(1, 0, len(FIELDS), T0, 1.0) + values.tobytes()


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", type=int, default=20_000)
    args = ap.parse_args()
    n, r = args.number, args.repeat
    payload = reading_json()
    try:
        import orjson  # noqa: PLC0415
    except ImportError:
        orjson = None

    typed = decoder_for("json", FIELDS)
    untyped = msgspec.json.Decoder()
    struct_only = typed._reading  # type: ignore[attr-defined]
    print(f"one reading, JSON, {len(payload)} bytes, {len(FIELDS)} fields "
          f"(best of {r} x {n} calls, us per message)")
    rows: list[tuple[str, float | None]] = [
        ("parse: stdlib json.loads", best_us(lambda: json.loads(payload), n, r)),
        ("parse: orjson.loads",
         best_us(lambda: orjson.loads(payload), n, r) if orjson else None),
        ("parse: msgspec untyped", best_us(lambda: untyped.decode(payload), n, r)),
        ("parse: msgspec typed struct", best_us(lambda: struct_only.decode(payload), n, r)),
        ("decode: stdlib json + checks (the generic path)",
         best_us(lambda: _decode_json(payload, FIELDS, NOW), n, r)),
        ("decode: orjson + the same checks",
         best_us(lambda: _from_object(orjson.loads(payload), FIELDS, NOW), n, r)
         if orjson else None),
        ("decode: msgspec untyped + the same checks",
         best_us(lambda: _from_object(untyped.decode(payload), FIELDS, NOW), n, r)),
        ("decode: msgspec typed struct (agent.decode.decoder_for)",
         best_us(lambda: typed(payload, NOW), n, r)),
    ]
    base = rows[4][1] or 1.0
    for name, us in rows:
        if us is None:
            print(f"  {name:56s}  not installed (.venv/bin/pip install orjson)")
        else:
            print(f"  {name:56s} {us:6.2f} us  {base / us:5.2f}x the generic path")

    frames = {
        "JSON": (json.dumps(frame_obj()).encode(), decoder_for("json", FIELDS)),
        "msgpack": (msgspec.msgpack.encode(frame_obj()), decoder_for("msgpack", FIELDS)),
        "f32": (frame_f32(), decoder_for("f32", FIELDS)),
    }
    print(f"a frame of {FRAME} samples x {len(FIELDS)} channels")
    fn = max(1, n // 10)
    for name, (body, dec) in frames.items():
        us = best_us(lambda body=body, dec=dec: dec(body, NOW), fn, r)
        print(f"  {name:8s} {len(body):5d} bytes {us:7.2f} us per frame, "
              f"{us / FRAME * 1e3:7.1f} ns per sample, {FRAME / us * 1e6:12,.0f} samples/s")


if __name__ == "__main__":
    main()
