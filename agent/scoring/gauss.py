"""Windowed Gaussian tail score: the newest sample against the mean/std of a trailing window."""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


class WindowedGaussianDetector:
    """1 - 2 Q(|z|) of each new sample against the last `history` samples (O(1) per sample)."""

    KEY: ClassVar[str] = "wgauss"

    def __init__(self, *, hop: int, warmup: int, seed: int = 0, history: int = 6400,
                 log_scale: bool = False) -> None:
        self.hop, self.warmup, self.seed, self.history = int(hop), int(warmup), int(seed), history
        self.log_scale = bool(log_scale)
        self.ring: F64 = np.zeros(history)
        self.n = 0  # samples seen
        self.ref = 0.0  # sums are kept relative to the first sample (less cancellation)
        self.s1 = 0.0
        self.s2 = 0.0
        self.started = False

    def score(self, windows: npt.NDArray[np.float32]) -> F64:
        """Tail score in [0, 1) per window: the most extreme of its new samples."""
        w = np.asarray(windows, np.float64)
        out = np.zeros(w.shape[0])
        for k in range(w.shape[0]):
            new = w[k, :, 0] if not self.started else w[k, -self.hop:, 0]
            self.started = True
            for x in new:
                out[k] = max(out[k], self._sample(float(x)))
        return out

    def _sample(self, x: float) -> float:
        if not math.isfinite(x):
            return 0.0
        if self.n == 0:
            self.ref = x
        d = x - self.ref
        m = min(self.n, self.history)
        s = 0.0
        if m > 1:
            mean = self.s1 / m
            var = max(self.s2 / m - mean * mean, 0.0)
            std = math.sqrt(var)
            if std > 1e-12 * max(abs(self.ref), 1.0):
                tail = math.erfc(abs(d - mean) / (std * math.sqrt(2.0)))
                # log_scale keeps resolution far out in the tail, where 1 - tail saturates.
                s = (min(math.log(max(tail, 1e-300)) / math.log(1e-10), 1.0)
                     if self.log_scale else 1.0 - tail)
            elif abs(d - mean) > 1e-12 * max(abs(self.ref), 1.0):
                s = 1.0  # any change of a constant signal
        i = self.n % self.history
        if self.n >= self.history:
            old = self.ring[i]
            self.s1 -= old
            self.s2 -= old * old
        self.ring[i] = d
        self.s1 += d
        self.s2 += d * d
        self.n += 1
        if self.n % self.history == 0:  # drop accumulated rounding once per lap
            self.s1 = float(self.ring.sum())
            self.s2 = float((self.ring * self.ring).sum())
        return s

    def to_state(self) -> dict[str, Any]:
        """Ring buffer and sums."""
        return {"hop": self.hop, "warmup": self.warmup, "seed": self.seed,
                "history": self.history, "log_scale": self.log_scale, "ring": self.ring.copy(),
                "n": self.n, "ref": self.ref,
                "s1": self.s1, "s2": self.s2, "started": self.started}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WindowedGaussianDetector:
        """Rebuild from `to_state()` output."""
        det = cls(hop=int(state["hop"]), warmup=int(state["warmup"]), seed=int(state["seed"]),
                  history=int(state["history"]), log_scale=bool(state["log_scale"]))
        det.ring = np.asarray(state["ring"], np.float64).copy()
        det.n, det.ref = int(state["n"]), float(state["ref"])
        det.s1, det.s2, det.started = float(state["s1"]), float(state["s2"]), bool(state["started"])
        return det
