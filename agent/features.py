"""Input normalisation: the model card's statistics, or this device's own.

A fleet model is trained on one machine's data; the sensors of another pump
sit at other operating points. With ``normalise: warmup`` the first half of a
stream's warm-up measures each channel's mean and spread on this device, and
the model sees inputs scaled the way it was trained. (Online, drifting
normalisation belongs to the adaptation layer.)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["Normaliser"]

# A channel that barely moved during warm-up would turn ordinary noise into a
# huge z-score later; its spread is floored at this fraction of the spread the
# model was trained on.
STD_FLOOR_FRACTION = 0.1


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
        b = block.astype(np.float64)
        nb = b.shape[0]
        mb = b.mean(axis=0)
        m2b = ((b - mb) ** 2).sum(axis=0)
        n = self._n + nb
        delta = mb - self._mean
        self._mean += delta * nb / n
        self._m2 += m2b + delta**2 * self._n * nb / n
        self._n = n
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
