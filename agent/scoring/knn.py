"""Nearest-neighbour novelty of the recent down-sampled pattern against a memory of past ones.

Written from the idea of KNN-CAD (Burnaev & Ishimtsev): a window's nonconformity is its distance to
the most similar windows seen before. Distances are taken in units of the value range seen so far,
so the scale is learned online from the warm-up and widens as values arrive.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


class KnnDetector:
    """Mean L1 distance (range units) of the last `length` block means to the k nearest stored."""

    KEY: ClassVar[str] = "knn"

    def __init__(self, *, hop: int, warmup: int, seed: int = 0, ds: int = 4, length: int = 8,
                 memory: int = 1024, k: int = 1, exclude: int = 8,
                 spike_frac: float = 0.1) -> None:
        self.hop, self.warmup, self.seed = int(hop), int(warmup), int(seed)
        self.ds, self.length, self.memory, self.k = int(ds), int(length), int(memory), int(k)
        # The newest patterns overlap the query, so they are never its neighbours.
        self.exclude = int(exclude)
        self.spike_frac = float(spike_frac)
        self.block: list[float] = []
        self.lo = math.inf
        self.hi = -math.inf
        self.hist: F64 = np.zeros(self.length)  # last `length` block means, raw units
        self.steps = 0  # block means produced
        self.store: F64 = np.zeros((self.memory, self.length))  # ring of past patterns
        self.stored = 0
        self.started = False

    def score(self, windows: npt.NDArray[np.float32]) -> F64:
        """Raw novelty per window (>= 0): nonzero only where a block completes."""
        w = np.asarray(windows, np.float64)
        out = np.zeros(w.shape[0])
        for i in range(w.shape[0]):
            new = w[i, :, 0] if not self.started else w[i, -self.hop:, 0]
            self.started = True
            for x in new:
                out[i] = max(out[i], self._sample(float(x)))
        return out

    def _sample(self, x: float) -> float:
        if not math.isfinite(x):
            return 0.0
        self.lo, self.hi = min(self.lo, x), max(self.hi, x)
        self.block.append(x)
        if len(self.block) < self.ds:
            return 0.0
        m = self._downsample()
        self.block = []
        self.hist[:-1] = self.hist[1:]
        self.hist[-1] = m
        self.steps += 1
        if self.steps < self.length:
            return 0.0
        span = self._span()
        n = self.stored - self.exclude
        s = 0.0
        if n >= self.k:
            # Ring positions of all stored patterns except the `exclude` newest.
            idx = (self.stored - self.exclude - 1 - np.arange(min(n, self.memory - self.exclude)))
            cand = self.store[idx % self.memory]
            d = np.abs(cand - self.hist).mean(axis=1) / span
            s = float(np.partition(d, self.k - 1)[: self.k].mean())
        self.store[self.stored % self.memory] = self.hist
        self.stored += 1
        return s

    def _span(self) -> float:
        # A constant signal still needs a finite scale; relative to its level where possible.
        return max(self.hi - self.lo, 1e-3 * abs(self.hi), 1e-9)

    def _downsample(self) -> float:
        """The block's mean, or its most extreme sample when that is a spike (ARTime's rule)."""
        b = np.asarray(self.block)
        m = float(b.mean())
        j = int(np.argmax(np.abs(b - m)))
        return float(b[j]) if abs(b[j] - m) >= self.spike_frac * self._span() else m

    def to_state(self) -> dict[str, Any]:
        """Parameters, range, block accumulator and the pattern memory."""
        return {"hop": self.hop, "warmup": self.warmup, "seed": self.seed, "ds": self.ds,
                "length": self.length, "memory": self.memory, "k": self.k,
                "exclude": self.exclude, "lo": self.lo, "hi": self.hi,
                "spike_frac": self.spike_frac, "block": list(self.block), "hist": self.hist.copy(),
                "steps": self.steps, "store": self.store.copy(), "stored": self.stored,
                "started": self.started}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> KnnDetector:
        """Rebuild from `to_state()` output."""
        det = cls(hop=int(state["hop"]), warmup=int(state["warmup"]), seed=int(state["seed"]),
                  ds=int(state["ds"]), length=int(state["length"]), memory=int(state["memory"]),
                  k=int(state["k"]), exclude=int(state["exclude"]),
                  spike_frac=float(state["spike_frac"]))
        det.lo, det.hi = float(state["lo"]), float(state["hi"])
        det.block = [float(v) for v in state["block"]]
        det.hist = np.asarray(state["hist"], np.float64).copy()
        det.steps, det.stored = int(state["steps"]), int(state["stored"])
        det.store = np.asarray(state["store"], np.float64).copy()
        det.started = bool(state["started"])
        return det
