"""Input normalisation: the model card's statistics, or this device's own.

A fleet model is trained on one machine's data; the sensors of another pump
sit at other operating points. With ``normalise: warmup`` the stream's warm-up
measures each channel's mean and spread on this device, and the model sees
inputs scaled the way it was trained. (Online, drifting normalisation belongs
to the adaptation layer.)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["Normaliser", "WarmupStash", "merge_moments"]

# A channel that barely moved during warm-up would turn ordinary noise into a
# huge z-score later; its spread is floored at this fraction of the spread the
# model was trained on.
STD_FLOOR_FRACTION = 0.1


def merge_moments(
    n: int, mean: npt.NDArray[np.float64], m2: npt.NDArray[np.float64],
    block: npt.NDArray[np.float64],
) -> int:
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


class Normaliser:
    """Per-channel z-scoring; in ``warmup`` mode the statistics are learnt first."""

    def __init__(
        self,
        mode: str,
        model_mean: npt.NDArray[np.float32],
        model_std: npt.NDArray[np.float32],
        learn_samples: int,
    ) -> None:
        self.mode = mode
        self.mean = model_mean.astype(np.float64)
        self.std = model_std.astype(np.float64)
        self._floor = model_std.astype(np.float64) * STD_FLOOR_FRACTION + 1e-9
        self.learn_samples = learn_samples if mode == "warmup" else 0
        # Chan et al. parallel update of count/mean/M2, merged per block of samples.
        self._n = 0
        self._mean = np.zeros_like(self.mean)
        self._m2 = np.zeros_like(self.mean)
        self.frozen = self.learn_samples == 0
        self._inv = (1.0 / self.std).astype(np.float32)
        self._mean32 = self.mean.astype(np.float32)

    def learn(self, block: npt.NDArray[np.float32]) -> None:
        """Fold a (n, channels) block of new samples into the statistics."""
        if self.frozen or block.shape[0] == 0:
            return
        self._n = merge_moments(self._n, self._mean, self._m2, block.astype(np.float64))
        if self._n >= self.learn_samples:
            self._freeze()

    def _freeze(self) -> None:
        self.frozen = True
        if self._n >= 2:
            self.mean = self._mean.copy()
            self.std = np.maximum(np.sqrt(self._m2 / (self._n - 1)), self._floor)
            self._inv = (1.0 / self.std).astype(np.float32)
            self._mean32 = self.mean.astype(np.float32)

    def apply(self, windows: npt.NDArray[np.float32]) -> None:
        """Normalise (n, window, channels) windows in place."""
        windows -= self._mean32
        windows *= self._inv


# Warm-up windows kept for re-scoring once the scaling is learnt; beyond this
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

    def add(self, windows: npt.NDArray[np.float32], end_ts: npt.NDArray[np.float64],
            end_index: npt.NDArray[np.int64]) -> None:
        for k in range(windows.shape[0]):
            if self._seen % self.stride == 0 and self.n < self.windows.shape[0]:
                self.windows[self.n] = windows[k]
                self.end_ts[self.n] = end_ts[k]
                self.end_index[self.n] = end_index[k]
                self.n += 1
            self._seen += 1
