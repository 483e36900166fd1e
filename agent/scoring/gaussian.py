"""Windowed-Gaussian detector for streams without a model, in numpy (no river)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from agent.scoring.base import F32, F64, StateError, halflife_weight

__all__ = ["GaussianDetector"]


class GaussianDetector:
    """How far the recent level of each channel sits from its long-run mean.

    A window's score is how many long-run standard deviations the mean of its
    last ``short`` samples sits from the long-run mean, the largest over the
    channels. The long run is an exponentially weighted mean and variance with
    ``halflife`` samples (2200 weighs the past like NAB's 6400-sample sliding
    window: the same mean age). Every sample updates it, anomalous or not, so a
    level shift becomes the new normal instead of alarming for ever. The score
    is a z-score, so it needs no input scaling: it reads raw values.
    """

    KEY: ClassVar[str] = "gaussian"
    scaled = False
    learns = True
    READY_AFTER = 50  # samples before the spread means anything

    def __init__(self, channels: int, *, hop: int = 1, halflife: int = 2200, short: int = 10
                 ) -> None:
        self.channels = channels
        self.hop = hop
        self.halflife = halflife
        self.short = short
        self._a = halflife_weight(1, halflife)
        self.mean: F64 = np.zeros(channels)
        self.var: F64 = np.zeros(channels)
        self.n = 0

    @property
    def ready(self) -> bool:
        return self.n >= self.READY_AFTER

    def _fold(self, x: F64) -> None:
        # Plain running mean/variance until there are about 1/a samples, then
        # exponential: early samples are not over-weighted by the start value.
        a = max(self._a, 1.0 / (self.n + 1))
        d = x - self.mean
        self.mean = self.mean + a * d
        self.var = (1 - a) * (self.var + a * d * d)
        self.n += 1

    def fit(self, windows: F32) -> None:
        """Nothing to fit: it learns from every sample as it scores."""

    def score(self, windows: F32) -> F32:
        """Score (n, window, channels) windows in order, folding each one's new samples in."""
        s = min(self.short, windows.shape[1])
        out = np.empty(windows.shape[0], dtype=np.float32)
        for k in range(windows.shape[0]):
            w = windows[k].astype(np.float64)
            if self.ready:
                sd = np.sqrt(np.maximum(self.var, 1e-12))
                out[k] = float(np.max(np.abs(w[-s:].mean(axis=0) - self.mean) / sd))
            else:
                out[k] = 0.0
            for row in w[-min(self.hop, w.shape[0]):]:
                self._fold(row)
        return out

    def learn(self, windows: F32) -> None:
        """Nothing to do: score() already learnt from every window, normal or not."""

    def to_state(self) -> dict[str, Any]:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "n": self.n}

    def load_state(self, state: dict[str, Any]) -> None:
        mean, var = np.asarray(state["mean"], np.float64), np.asarray(state["var"], np.float64)
        if mean.shape != (self.channels,) or var.shape != (self.channels,):
            raise StateError(f"gaussian state has {mean.shape} channels, stream has "
                             f"{self.channels}")
        self.mean, self.var, self.n = mean, var, int(state["n"])
