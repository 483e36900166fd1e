"""PCA T² + Q over normalised windows: a multichannel detector without a model."""

from __future__ import annotations

import itertools
import logging
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

__all__ = ["PcaDetector", "PcaT2Q"]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# samples: every sample of a window is a row; summary: per window, each field's mean and
# standard deviation; mean: per window, each field's mean.
FEATURES = ("samples", "summary", "mean")


class PcaT2Q:
    """Hotelling T² in the principal subspace plus the residual Q.

    By default each window is one row of features, every field's window mean
    and standard deviation (``features="summary"``): a mean over 16 samples
    shows a sustained shift four times more clearly than single samples do
    (on valve1: F1 0.81 at FAR 4 % against 0.77 at FAR 10-17 % per sample).
    ``features="samples"`` scores every sample of the window and averages.

    The fit is robust: centre at the median, then a few trimming passes that
    drop the samples farthest out in (shrunk-covariance) Mahalanobis distance
    before the final covariance, so a short fault in the warm-up is not learnt
    as normal. Shrinkage towards a scaled identity keeps the covariance well
    conditioned with few warm-up samples or constant channels.
    """

    KEY: ClassVar[str] = "pca"

    def __init__(self, *, n_fields: int, window: int, hop: int, variance: float = 0.95,
                 shrinkage: float = 0.05, trim: float = 0.1, passes: int = 2,
                 features: str = "summary") -> None:
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        self.n_fields, self.window, self.hop = int(n_fields), int(window), int(hop)
        self.features = features
        # summary: one row per window, each field's window mean and standard deviation.
        self.dim = self.n_fields * (2 if features == "summary" else 1)
        self.variance, self.shrinkage = float(variance), float(shrinkage)
        self.trim, self.passes = float(trim), int(passes)
        self.center = np.zeros(self.dim)
        self.components = np.zeros((self.dim, 0))
        self.inv_eig = np.zeros(0)
        self.q_scale = 1.0

    def _cov(self, x: F64) -> F64:
        c = np.cov(x, rowvar=False).reshape(self.dim, self.dim)
        target = np.trace(c) / self.dim
        return np.asarray((1.0 - self.shrinkage) * c + self.shrinkage * target
                          * np.eye(self.dim), np.float64)

    def _rows(self, windows: F32) -> F64:
        """The rows the detector models: samples, or one summary row per window."""
        w = np.asarray(windows, dtype=np.float64)
        if self.features == "summary":
            return np.concatenate([w.mean(axis=1), w.std(axis=1)], axis=1)
        if self.features == "mean":
            return np.asarray(w.mean(axis=1), np.float64)
        return w.reshape(-1, self.n_fields)

    def fit(self, windows: F32) -> PcaT2Q:
        """Fit on the normalised warm-up windows (n, window, n_fields)."""
        x = self._rows(windows)
        center = np.median(x, axis=0)
        keep = x
        for _ in range(self.passes):
            cov = self._cov(keep - center)
            d = np.einsum("ij,jk,ik->i", x - center, np.linalg.pinv(cov), x - center)
            keep = x[d <= np.quantile(d, 1.0 - self.trim)]
            center = np.median(keep, axis=0)
        cov = self._cov(keep - center)
        eig, vec = np.linalg.eigh(cov)
        order = np.argsort(eig)[::-1]
        eig, vec = np.maximum(eig[order], 1e-12), vec[:, order]
        k = int(np.searchsorted(np.cumsum(eig) / eig.sum(), self.variance) + 1)
        k = min(max(k, 1), self.dim)
        self.center, self.components, self.inv_eig = center, vec[:, :k], 1.0 / eig[:k]
        # Q is put on T²'s scale per dimension: its median on the kept samples counts as 1.
        q = self._q(keep)
        self.q_scale = float(max(np.median(q), 1e-9))
        log.debug("pca: %d of %d components, q scale %.3g", k, self.n_fields, self.q_scale)
        return self

    def fit_scores(self, windows: F32, folds: int = 2, oof_weight: float = 1.0) -> F64:
        """Fit on all warm-up windows; return their out-of-fold scores, for calibration.

        In-sample scores of the warm-up are optimistic (the fit has seen them), so a
        threshold learnt on them sits below what new normal windows score. Each
        contiguous block of windows is scored by a fit on the others instead; those
        are pessimistic (each fit saw less, and another part of the warm-up).
        ``oof_weight`` < 1 blends the two geometrically (0.632: Efron's .632 rule).
        """
        n = windows.shape[0]
        out = np.empty(n, np.float64)
        bounds = np.linspace(0, n, folds + 1).round().astype(int)
        for a, b in itertools.pairwise(bounds.tolist()):
            rest = np.concatenate([windows[:a], windows[b:]])
            if rest.shape[0] < 2 or b <= a:
                continue
            out[a:b] = self.fit(rest).score(windows[a:b])
        inside = self.fit(windows).score(windows)
        if oof_weight >= 1.0:
            return out
        w = float(oof_weight)
        return np.asarray(np.exp(w * np.log(np.maximum(out, 1e-12))
                                 + (1.0 - w) * np.log(np.maximum(inside, 1e-12))), np.float64)

    def _q(self, x: F64) -> F64:
        xc = x - self.center
        t = xc @ self.components
        r = xc - t @ self.components.T
        return np.asarray(np.einsum("ij,ij->i", r, r), np.float64)

    def score(self, windows: F32) -> F64:
        """Per window: mean over its samples of T²/k + Q/q_scale."""
        n = windows.shape[0]
        x = self._rows(windows) - self.center
        t = x @ self.components
        t2 = (t * t) @ self.inv_eig / self.components.shape[1]
        r = x - t @ self.components.T
        q = np.einsum("ij,ij->i", r, r) / self.q_scale
        return np.asarray((t2 + q).reshape(n, -1).mean(axis=1), np.float64)

    def to_state(self) -> dict[str, Any]:
        """Settings and the fitted projection, JSON-ready."""
        return {"key": self.KEY, "n_fields": self.n_fields, "window": self.window,
                "hop": self.hop, "variance": self.variance, "shrinkage": self.shrinkage,
                "trim": self.trim, "passes": self.passes, "features": self.features,
                "center": self.center.tolist(),
                "components": self.components.tolist(), "inv_eig": self.inv_eig.tolist(),
                "q_scale": self.q_scale}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> PcaT2Q:
        """Rebuild a detector saved by ``to_state``."""
        p = cls(n_fields=d["n_fields"], window=d["window"], hop=d["hop"], variance=d["variance"],
                shrinkage=d["shrinkage"], trim=d["trim"], passes=d["passes"],
                features=d["features"])
        p.center = np.asarray(d["center"], np.float64)
        p.components = np.asarray(d["components"], np.float64).reshape(p.dim, -1)
        p.inv_eig = np.asarray(d["inv_eig"], np.float64)
        p.q_scale = float(d["q_scale"])
        return p


PCA_FEATURES = "summary"


class PcaDetector:
    """``PcaT2Q`` as a stream's scorer: fitted on the scaled warm-up windows at its end."""

    KEY: ClassVar[str] = "pca"
    scaled = True
    learns = True

    def __init__(self, *, n_fields: int, window: int, hop: int) -> None:
        self.pca = PcaT2Q(n_fields=n_fields, window=window, hop=hop, features=PCA_FEATURES)
        self.fitted = False

    def fit(self, windows: F32) -> F32 | None:
        """Fit on the warm-up windows; their out-of-fold scores calibrate the threshold."""
        if windows.shape[0] < 8:
            raise ValueError(f"pca needs at least 8 warm-up windows, got {windows.shape[0]}")
        scores = self.pca.fit_scores(windows)
        self.fitted = True
        return scores.astype(np.float32)

    def score(self, windows: F32) -> F32:
        if not self.fitted:
            return np.zeros(windows.shape[0], np.float32)
        return self.pca.score(windows).astype(np.float32)

    def learn(self, windows: F32) -> None:
        """The components stay as the warm-up fitted them."""

    def to_state(self) -> dict[str, Any]:
        return {"fitted": self.fitted, **self.pca.to_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        body = {k: v for k, v in state.items() if k != "fitted"}
        pca = PcaT2Q.from_state(body)
        if (pca.n_fields, pca.window) != (self.pca.n_fields, self.pca.window):
            from agent.scoring.base import StateError  # noqa: PLC0415

            raise StateError("pca state is for another stream shape")
        self.pca, self.fitted = pca, bool(state["fitted"])
