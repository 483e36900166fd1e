"""Regenerate the misbehaving models the fleet tests push (needs the `train` extra).

    .venv-train/bin/python scripts/make_fleet_models.py

Each is a valid float32 .tflite over the shipped skab-ae input (16 x 8 = 128
values in, 128 out), built by hand-set weights rather than training:

- nan-ae.tflite: every output is NaN (a model that loads and runs but is broken).
- loud-ae.tflite: every output is 10.0, so every window scores ~100: an alert
  storm at any threshold calibrated on the real model.
- fragile-ae.tflite: the identity (scores ~0) while every input stays below
  20 standard deviations; an input x above that adds 1e30 * (x - 20) to its
  output, so the squared error overflows float32 to inf. It passes a canary
  on normal data and fails once a real anomaly arrives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fleet"
N = 128


def _convert(model: tf.keras.Model, name: str) -> None:
    model(np.zeros((1, N), np.float32))
    data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    (OUT / name).write_bytes(data)
    print(f"wrote {OUT / name} ({len(data)} bytes)")


def constant(value: float) -> tf.keras.Model:
    inp = tf.keras.Input(shape=(N,))
    dense = tf.keras.layers.Dense(N)
    out = dense(inp)
    model = tf.keras.Model(inp, out)
    dense.set_weights([np.zeros((N, N), np.float32), np.full(N, value, np.float32)])
    return model


def fragile() -> tf.keras.Model:
    inp = tf.keras.Input(shape=(N,))
    ident = tf.keras.layers.Dense(N)
    gate = tf.keras.layers.Dense(N, activation="relu")
    blow = tf.keras.layers.Dense(N)
    out = tf.keras.layers.Add()([ident(inp), blow(gate(inp))])
    model = tf.keras.Model(inp, out)
    eye = np.eye(N, dtype=np.float32)
    ident.set_weights([eye, np.zeros(N, np.float32)])
    # relu(x - 20) is 0 for x < 20; above it a 1e30 gain makes the score overflow.
    gate.set_weights([eye, np.full(N, -20.0, np.float32)])
    blow.set_weights([eye * np.float32(1e30), np.zeros(N, np.float32)])
    return model


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    _convert(constant(float("nan")), "nan-ae.tflite")
    _convert(constant(10.0), "loud-ae.tflite")
    _convert(fragile(), "fragile-ae.tflite")


if __name__ == "__main__":
    main()
