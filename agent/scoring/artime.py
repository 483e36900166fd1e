"""Fuzzy-ART novelty detector over Haar-wavelet features of a down-sampled, range-normalised signal.

Written from the published description of ARTime (Lavin & Ahmad's NAB; ARTime's README/paper):
the signal is down-sampled (block mean, or the block's spike when one sample is far from the
mean), normalised by the range seen so far, and the last `feat_len` down-sampled values plus their
Haar detail coefficients are clustered online with fuzzy ART (complement coding, fast learning).
The raw score is how far the best-matching category is from resonating, i.e. 0 when the pattern
is known and growing when it is new. No code from the AGPL reference implementation is used.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


def haar_details(x: F64) -> F64:
    """Haar detail coefficients of a length-2^k vector, finest first (length 2^k - 1)."""
    out = []
    a = x
    while len(a) > 1:
        out.append(0.5 * (a[0::2] - a[1::2]))
        a = 0.5 * (a[0::2] + a[1::2])
    return np.concatenate(out)


class ArtimeDetector:
    """Online fuzzy-ART novelty score of one channel; learns range and categories as it goes."""

    KEY: ClassVar[str] = "artime"
    _SCALARS: ClassVar[tuple[str, ...]] = (
        "hop", "warmup", "seed", "ds", "feat_len", "rho", "max_categories", "spike_frac",
        "levels", "detail_gain", "graded", "n_seen", "lo", "hi", "n_cat", "step", "started",
    )

    def __init__(self, *, hop: int, warmup: int, seed: int = 0, ds: int = 4, feat_len: int = 8,
                 rho: float = 0.93, max_categories: int = 256, spike_frac: float = 0.1,
                 levels: int = 0, detail_gain: float = 1.0, graded: bool = True) -> None:
        if feat_len < 2 or feat_len & (feat_len - 1):
            raise ValueError("feat_len must be a power of two >= 2")
        self.hop, self.warmup, self.seed = int(hop), int(warmup), int(seed)
        self.ds, self.feat_len, self.rho = int(ds), int(feat_len), float(rho)
        self.max_categories, self.spike_frac = int(max_categories), float(spike_frac)
        self.levels, self.detail_gain = int(levels), float(detail_gain)
        self.graded = bool(graded)
        dim = 2 * self.feat_len - 1
        self.n_seen = 0
        self.lo = float("nan")
        self.hi = float("nan")
        self.n_cat = 0
        self.step = 0  # down-sampled steps taken
        self.started = False  # whether the first window has been consumed
        self.block: F64 = np.zeros(0)  # samples of the current down-sampling block
        self.hist: F64 = np.zeros(0)  # last feat_len down-sampled values, raw units
        # Category boxes in feature space [0,1]^dim: lower and upper corners (complement coding).
        self.lower: F64 = np.zeros((self.max_categories, dim))
        self.upper: F64 = np.zeros((self.max_categories, dim))
        self.last_used: npt.NDArray[np.int64] = np.zeros(self.max_categories, np.int64)

    # -- streaming ---------------------------------------------------------------------------

    def score(self, windows: npt.NDArray[np.float32]) -> F64:
        """Raw novelty score (>= 0) per window; learns from each window's new samples."""
        w = np.asarray(windows, np.float64)
        n = w.shape[0]
        out = np.zeros(n)
        for k in range(n):
            new = w[k, :, 0] if not self.started else w[k, -self.hop:, 0]
            self.started = True
            s = 0.0
            for x in new:
                s = max(s, self._sample(float(x)))
            out[k] = s
        return out

    def _sample(self, x: float) -> float:
        """Feed one sample; the score of the down-sampled step it completes, else 0."""
        if not np.isfinite(x):
            return 0.0
        self.n_seen += 1
        if self.n_seen == 1:
            self.lo = self.hi = x
        elif x < self.lo or x > self.hi:
            self._widen(min(self.lo, x), max(self.hi, x))
        self.block = np.append(self.block, x)
        if len(self.block) < self.ds:
            return 0.0
        y = self._downsample(self.block)
        self.block = np.zeros(0)
        self.hist = np.append(self.hist, y)[-self.feat_len:]
        if len(self.hist) < self.feat_len:
            return 0.0
        self.step += 1
        return self._match(self._features())

    def _downsample(self, b: F64) -> float:
        """The block's mean, or its most extreme sample when that is a spike."""
        m = float(b.mean())
        j = int(np.argmax(np.abs(b - m)))
        if abs(b[j] - m) >= self.spike_frac * self._span():
            return float(b[j])
        return m

    def _span(self) -> float:
        # A constant signal still needs a finite scale; relative to its level where possible.
        return max(self.hi - self.lo, 1e-3 * abs(self.hi), 1e-9)

    def _features(self) -> F64:
        z = (self.hist - self.lo) / self._span()
        if self.levels:
            z = np.round(z * self.levels) / self.levels
        d = np.clip(self.detail_gain * haar_details(z) + 0.5, 0.0, 1.0)
        return np.concatenate([np.clip(z, 0.0, 1.0), d])

    def _widen(self, lo: float, hi: float) -> None:
        """Move the range and map the learned boxes into the new coordinates (affine per dim)."""
        old_lo, old_span = self.lo, self._span()
        self.lo, self.hi = lo, hi
        if self.n_cat == 0:
            return
        a = old_span / self._span()
        b = (old_lo - self.lo) / self._span()
        f = self.feat_len
        c = self.n_cat
        for box in (self.lower, self.upper):
            box[:c, :f] = a * box[:c, :f] + b
            # Detail coefficients scale by `a` around their 0.5 offset.
            box[:c, f:] = a * (box[:c, f:] - 0.5) + 0.5

    def _match(self, x: F64) -> float:
        """Fuzzy-ART step: resonate with the best category or create one; returns 1 - best match."""
        c = self.n_cat
        dim = x.shape[0]
        if c:
            lo, up = self.lower[:c], self.upper[:c]
            size = (up - lo).sum(axis=1)
            grow = np.maximum(lo - x, 0.0).sum(axis=1) + np.maximum(x - up, 0.0).sum(axis=1)
            match = 1.0 - (size + grow) / dim  # |I ^ w| / |I| with complement coding
            choice = (dim - size - grow) / (1e-3 + dim - size)
            ok = match >= self.rho
            if ok.any():
                j = int(np.argmax(np.where(ok, choice, -np.inf)))
                np.minimum(self.lower[j], x, out=self.lower[j])
                np.maximum(self.upper[j], x, out=self.upper[j])
                self.last_used[j] = self.step
                return 0.0
            best = float(match.max())
        else:
            best = 0.0
        self._create(x)
        # A new category is the anomaly signal; `graded` scales it by how far the nearest
        # category was from resonating (1 - rho away -> 0.5, twice that or more -> 1).
        if not self.graded:
            return 1.0
        return float(min(0.5 * (1.0 - best) / max(1.0 - self.rho, 1e-9), 1.0))

    def _create(self, x: F64) -> None:
        if self.n_cat < self.max_categories:
            j = self.n_cat
            self.n_cat += 1
        else:
            j = int(np.argmin(self.last_used))  # evict the least recently used category
        self.lower[j] = x
        self.upper[j] = x
        self.last_used[j] = self.step

    # -- state -------------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything needed to continue scoring exactly where this left off."""
        st: dict[str, Any] = {k: getattr(self, k) for k in self._SCALARS}
        st.update(block=self.block.copy(), hist=self.hist.copy(),
                  lower=self.lower[: self.n_cat].copy(), upper=self.upper[: self.n_cat].copy(),
                  last_used=self.last_used[: self.n_cat].copy())
        return st

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ArtimeDetector:
        """Rebuild a detector from `to_state()` output."""
        det = cls(hop=int(state["hop"]), warmup=int(state["warmup"]), seed=int(state["seed"]),
                  ds=int(state["ds"]), feat_len=int(state["feat_len"]), rho=float(state["rho"]),
                  max_categories=int(state["max_categories"]),
                  spike_frac=float(state["spike_frac"]), levels=int(state["levels"]),
                  detail_gain=float(state["detail_gain"]), graded=bool(state["graded"]))
        for k in ("n_seen", "n_cat", "step"):
            setattr(det, k, int(state[k]))
        det.lo, det.hi = float(state["lo"]), float(state["hi"])
        det.started = bool(state["started"])
        det.block = np.asarray(state["block"], np.float64).copy()
        det.hist = np.asarray(state["hist"], np.float64).copy()
        c = det.n_cat
        det.lower[:c] = np.asarray(state["lower"], np.float64)
        det.upper[:c] = np.asarray(state["upper"], np.float64)
        det.last_used[:c] = np.asarray(state["last_used"], np.int64)
        return det
