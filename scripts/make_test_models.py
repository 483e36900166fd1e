"""Regenerate the tiny models the test suite uses (needs the `train` extra).

    .venv-train/bin/python scripts/make_test_models.py

Writes tests/data/float-ae.tflite: an untrained float32 dense autoencoder
(32 -> 8 -> 32), used only to check that float32 models run unquantised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.Input(shape=(32,)),
        tf.keras.layers.Dense(8, activation="relu"),
        tf.keras.layers.Dense(32),
    ])
    model(np.zeros((1, 32), np.float32))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "float-ae.tflite").write_bytes(conv.convert())
    print(f"wrote {OUT / 'float-ae.tflite'}")


if __name__ == "__main__":
    main()
