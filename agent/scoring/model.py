"""A model as a scorer: run its backend on scaled windows, turn the output into a score."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from agent.scoring.backend import Backend
from agent.scoring.base import F32
from agent.scoring.card import ModelCard, ModelError

__all__ = ["ModelScorer"]

F32_MAX = float(np.finfo(np.float32).max)


class ModelScorer:
    """Scores scaled windows with one model; the card says how its output becomes a score."""

    KEY: ClassVar[str] = "model"
    scaled = True
    learns = False

    def __init__(self, card: ModelCard, backend: Backend) -> None:
        self.card = card
        self.backend = backend
        self.kind = card.score_kind
        flat = card.window * len(card.fields)
        if math.prod(backend.input_shape) != flat:
            raise ModelError(f"{card.path}: model input {backend.input_shape} does not hold "
                             f"window {card.window} x {len(card.fields)} fields")
        if self.kind == "direct":
            if math.prod(backend.output_shape) != 1:
                raise ModelError(f"{card.path}: a direct-score model needs one output per "
                                 f"window, not {backend.output_shape}")
        elif backend.output_shape != backend.input_shape:
            raise ModelError(f"{card.path}: reconstruction model needs output shape == input "
                             f"shape")

    def fit(self, windows: F32) -> None:
        """A shipped model is trained offline: nothing to fit."""

    def score(self, windows: F32) -> F32:
        """Reconstruction error (or the model's own score) per scaled window."""
        n = windows.shape[0]
        x = windows.reshape(n, *self.backend.input_shape)
        out = self.backend.predict(x)
        if self.kind == "direct":
            return np.asarray(out.reshape(n), dtype=np.float32)
        # float64: a reading near float32's range squares to infinity in float32.
        err = np.subtract(out, x, dtype=np.float64)  # = out.astype(float64) - x
        if self.kind == "reconstruction_mae":
            np.abs(err, out=err)
        else:
            np.square(err, out=err)
        # .mean(axis=1) without its Python wrapper: the same sum, divided the same way
        # (by the count as a float64: an integer operand costs numpy a cast per call).
        flat = err.reshape(n, -1)
        mean = np.add.reduce(flat, axis=1)
        mean /= float(flat.shape[1])
        if float(np.maximum.reduce(mean)) <= F32_MAX:  # NaN: False
            scores: F32 = mean.astype(np.float32)  # nothing overflows: no errstate needed
        else:
            with np.errstate(over="ignore"):
                scores = mean.astype(np.float32)
        return scores

    def learn(self, windows: F32) -> None:
        """The model does not learn on the device."""

    def to_state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """No state: the model file is the state."""
