"""Features: per-channel scaling learnt on this device, before the scorer sees a window.

A fleet model is trained on one machine's data; the sensors of another pump
sit at other operating points. With ``normalise: warmup`` the stream's warm-up
measures each channel's mean and spread on this device, and the model sees
inputs scaled the way it was trained. After warm-up the statistics follow
slow drift of samples from windows judged normal (``input_halflife``), so an
anomaly never teaches the scaling that it is normal. ``normalise: model``
keeps the model card's statistics. Scorers that read raw values (detectors
that keep their own range) skip this stage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from agent.scoring.base import F32, F64, StateError

__all__ = ["STD_FLOOR_FRACTION", "Scaling", "WarmupStash", "merge_moments"]

# A channel that barely moved during warm-up would turn ordinary noise into a
# huge z-score later; its spread is floored at this fraction of the spread the
# model was trained on.
STD_FLOOR_FRACTION = 0.1


def merge_moments(n: int, mean: F64, m2: F64, block: F64) -> int:
    """Fold an (m, columns) block into count/mean/M2 (Chan et al.), in place; the new count."""
    m = int(block.shape[0])
    if m == 0:
        return n
    mb = block.mean(axis=0)
    total = n + m
    delta = mb - mean
    mean += delta * (m / total)
    m2 += ((block - mb) ** 2).sum(axis=0) + delta**2 * (n * m / total)
    return total


def halflife_weight(n: float, halflife: float) -> float:
    """Weight of ``n`` new samples in an exponential average with this half-life."""
    return float(1.0 - 0.5 ** (n / halflife))


class Scaling:
    """Per-channel z-scoring: the card's statistics, or learnt in warm-up and then tracked."""

    def __init__(self, mode: str, model_mean: F32, model_std: F32, *, halflife: int = 0
                 ) -> None:
        self.mode = mode
        self.halflife = halflife
        self._floor = model_std.astype(np.float64) * STD_FLOOR_FRACTION + 1e-9
        self.mean: F64 = model_mean.astype(np.float64)
        self.var: F64 = model_std.astype(np.float64) ** 2
        self.frozen = mode != "warmup"
        # Chan et al. parallel update of count/mean/M2, merged per block of samples.
        self._n = 0
        self._mean = np.zeros_like(self.mean)
        self._m2 = np.zeros_like(self.mean)
        self._refresh()

    @property
    def std(self) -> F64:
        return np.maximum(np.sqrt(self.var), self._floor)

    def _refresh(self) -> None:
        self._inv = (1.0 / self.std).astype(np.float32)
        self._mean32 = self.mean.astype(np.float32)

    def use_card(self, mean: F32, std: F32) -> None:
        """``normalise: model``: take a (newly swapped-in) model card's statistics."""
        if self.mode == "model":
            self.mean, self.var = mean.astype(np.float64), std.astype(np.float64) ** 2
            self._floor = std.astype(np.float64) * STD_FLOOR_FRACTION + 1e-9
            self._refresh()

    def learn(self, block: F32) -> None:
        """Warm-up: fold a (n, channels) block of new samples into the statistics."""
        if self.frozen or block.shape[0] == 0:
            return
        self._n = merge_moments(self._n, self._mean, self._m2, block.astype(np.float64))

    def freeze(self) -> None:
        """Warm-up is over: the learnt statistics become the scaling."""
        if self.frozen:
            return
        self.frozen = True
        if self._n >= 2:
            self.mean = self._mean.copy()
            self.var = self._m2 / (self._n - 1)
            self._refresh()

    def track(self, block: F32) -> None:
        """After warm-up: fold a block of new normal samples into the drifting statistics."""
        nb = block.shape[0]
        if not self.frozen or self.mode != "warmup" or self.halflife <= 0 or nb == 0:
            return
        b = block.astype(np.float64)
        bm = b.mean(axis=0)
        w = halflife_weight(nb, self.halflife)
        d = bm - self.mean
        # Variance of the mixture of the old distribution and the block, weighted.
        self.var = (1 - w) * self.var + w * b.var(axis=0) + w * (1 - w) * d**2
        self.mean = self.mean + w * d
        self._refresh()

    def apply(self, windows: F32) -> None:
        """Scale (n, window, channels) windows in place."""
        windows -= self._mean32
        windows *= self._inv

    def to_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "frozen": self.frozen, "mean": self.mean, "var": self.var,
                "n": self._n, "acc_mean": self._mean, "acc_m2": self._m2}

    def load_state(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise StateError(f"scaling mode {state['mode']!r} != {self.mode!r}")
        mean = np.asarray(state["mean"], np.float64)
        if mean.shape != self.mean.shape:
            raise StateError(f"scaling has {mean.shape} channels, stream {self.mean.shape}")
        self.frozen = bool(state["frozen"])
        self.mean, self.var = mean, np.asarray(state["var"], np.float64)
        self._n = int(state["n"])
        self._mean = np.asarray(state["acc_mean"], np.float64)
        self._m2 = np.asarray(state["acc_m2"], np.float64)
        self._refresh()


# Warm-up windows kept for scoring once the scaling is learnt; beyond this
# many, every k-th window is kept (the threshold is a quantile: a uniform
# subsample estimates it as well).
WARMUP_STASH_MAX = 4096


class WarmupStash:
    """Windows seen while the scaling was still being learnt, to score once it is.

    With it, warm-up learns the scaling from *all* warm-up samples and still
    calibrates the threshold on all warm-up windows, instead of splitting the
    warm-up in two halves (on SKAB valve1 the split cost ~0.05 F1 at the same
    false-alarm rate: the second half's normal state had already moved).
    """

    def __init__(self, expected_windows: int, window: int, channels: int) -> None:
        cap = max(1, min(expected_windows, WARMUP_STASH_MAX))
        self.stride = -(-max(expected_windows, 1) // cap)
        self.windows = np.zeros((cap, window, channels), dtype=np.float32)
        self.end_ts = np.zeros(cap, dtype=np.float64)
        self.end_index = np.zeros(cap, dtype=np.int64)
        self.n = 0
        self._seen = 0

    def __len__(self) -> int:
        return self.n

    def add(self, windows: F32, end_ts: F64, end_index: npt.NDArray[np.int64]) -> None:
        for k in range(windows.shape[0]):
            if self._seen % self.stride == 0 and self.n < self.windows.shape[0]:
                self.windows[self.n] = windows[k]
                self.end_ts[self.n] = end_ts[k]
                self.end_index[self.n] = end_index[k]
                self.n += 1
            self._seen += 1
