"""PCA T² + Q over normalised windows: a multichannel detector without a model.

The projection is fitted robustly on the warm-up and then follows the machine
(recursive PCA): the windows the stream calls normal update an exponentially
weighted mean and covariance, and every few dozen windows the components are
recomputed from them. A pump that starts cold vibrates and flows differently an
hour later; a projection frozen on its first minutes calls that new normal an
anomaly (on SKAB's healthy pump, shipped config: 2 alerts and 92 % of the 2.5 h in
alarm frozen, none adapting). Windows inside an episode are never learnt.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from agent.scoring.base import StateError

__all__ = ["PcaDetector", "PcaT2Q"]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# samples: every sample of a window is a row; summary: per window, each field's mean and
# standard deviation; mean: per window, each field's mean.
FEATURES = ("samples", "summary", "mean")
# A normal window learnt by the recursive PCA counts fully up to this many times the
# typical normal score; above it, its weight falls as 1/score (bounded influence).
HUBER = 3.0


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
        # Recursive PCA: the running mean and (unshrunk) covariance of normal rows, the
        # residual variance and Q scale the fit started from, rows learnt since.
        self.run_mean = np.zeros(self.dim)
        self.run_cov = np.zeros((self.dim, self.dim))
        self.run_weight = 0.0
        self.typical = 1.0  # median score of the warm-up rows the fit kept
        self.residual0 = 1.0
        self.q_scale0 = 1.0
        self.learnt = 0

    def _shrink(self, c: F64) -> F64:
        target = np.trace(c) / self.dim
        return np.asarray((1.0 - self.shrinkage) * c + self.shrinkage * target
                          * np.eye(self.dim), np.float64)

    def _cov(self, x: F64) -> F64:
        return self._shrink(np.asarray(np.cov(x, rowvar=False).reshape(self.dim, self.dim),
                                       np.float64))

    def _project(self, cov: F64, k: int | None = None) -> F64:
        """Set the components from a (shrunk) covariance; its eigenvalues, largest first."""
        eig, vec = np.linalg.eigh(cov)
        order = np.argsort(eig)[::-1]
        eig, vec = np.maximum(eig[order], 1e-12), vec[:, order]
        if k is None:
            k = int(np.searchsorted(np.cumsum(eig) / eig.sum(), self.variance) + 1)
            k = min(max(k, 1), self.dim)
        self.components, self.inv_eig = vec[:, :k], 1.0 / eig[:k]
        return np.asarray(eig, np.float64)

    def _rows(self, windows: F32) -> F64:
        """The rows the detector models: samples, or one summary row per window."""
        if self.features == "samples":
            return np.asarray(windows, dtype=np.float64).reshape(-1, self.n_fields)
        # Each field's samples contiguous, (n, fields, window): numpy reduces the last
        # axis several times faster than the middle one of a narrow window.
        w = np.ascontiguousarray(np.asarray(windows).transpose(0, 2, 1), dtype=np.float64)
        mean: F64 = w.mean(axis=2)
        if self.features == "mean":
            return mean
        w -= mean[:, :, None]
        w *= w
        return np.concatenate([mean, np.sqrt(w.mean(axis=2))], axis=1)

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
        raw = np.asarray(np.cov(keep - center, rowvar=False).reshape(self.dim, self.dim),
                         np.float64)
        self.center = center
        eig = self._project(self._shrink(raw))
        k = self.components.shape[1]
        # Q is put on T²'s scale per dimension: its median on the kept samples counts as 1.
        q = self._q(keep)
        self.q_scale = float(max(np.median(q), 1e-9))
        self.typical = float(max(np.median(self._row_scores(keep)), 1e-9))
        self.run_mean, self.run_cov, self.run_weight = center.copy(), raw, 0.0
        self.residual0, self.q_scale0 = float(max(eig[k:].sum(), 1e-12)), self.q_scale
        self.learnt = 0
        log.debug("pca: %d of %d components, q scale %.3g", k, self.dim, self.q_scale)
        return self

    def learn(self, windows: F32, halflife: float, every: int = 32) -> None:
        """Fold normal windows into the running mean and covariance (half-life in rows:
        windows with the default summary features); every ``every`` rows learnt,
        recompute the projection from them.

        Each row's weight decays by half every ``halflife`` rows after it, and weighted
        moments merge exactly, so the running statistics do not depend on how the
        windows were batched (live, replayed, or one by one). The number of components
        stays as the warm-up chose it, and Q's scale moves with the residual variance,
        so scores stay on the scale the threshold was set on.
        """
        if windows.shape[0] and halflife > 0 and self.components.shape[1]:
            x = self._rows(windows)
            self.learn_rows(x, self._row_scores(x), halflife, every)

    def learn_rows(self, x: F64, scores: F64, halflife: float, every: int = 32) -> None:
        """``learn`` of rows already made, with their row scores under the current fit."""
        m = x.shape[0]
        if m == 0 or halflife <= 0 or self.components.shape[1] == 0:
            return
        decay = 0.5 ** (1.0 / halflife)
        if self.run_weight <= 0:  # the warm-up fit counts as a full history
            self.run_weight = 1.0 / (1.0 - decay)
        v = decay ** np.arange(m - 1, -1, -1, dtype=np.float64)
        # Bounded influence (Huber): a row scoring far above the typical normal one
        # counts less, so the early, still sub-threshold part of a fault cannot
        # inflate the covariance that would then hide the rest of it.
        v *= np.minimum(1.0, HUBER * self.typical / np.maximum(scores, 1e-12))
        vb = float(v.sum())
        if not vb > 0.0 or not np.isfinite(vb):  # nothing here can teach it anything
            return
        mb = v @ x / vb
        xc = x - mb
        cb = (xc * v[:, None]).T @ xc / vb
        w0 = self.run_weight * decay**m
        total = w0 + vb
        mean = (w0 * self.run_mean + vb * mb) / total
        d0, db = self.run_mean - mean, mb - mean
        self.run_cov = (w0 * (self.run_cov + np.outer(d0, d0))
                        + vb * (cb + np.outer(db, db))) / total
        self.run_mean, self.run_weight = mean, total
        before = self.learnt // every
        self.learnt += m
        if self.learnt // every != before:
            k = self.components.shape[1]
            self.center = self.run_mean.copy()
            eig = self._project(self._shrink(self.run_cov), k)
            self.q_scale = max(self.q_scale0 * float(eig[k:].sum()) / self.residual0, 1e-9)

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

    def _row_scores(self, rows: F64) -> F64:
        x = rows - self.center
        t = x @ self.components
        t2 = (t * t) @ self.inv_eig / self.components.shape[1]
        r = x - t @ self.components.T
        return np.asarray(t2 + np.einsum("ij,ij->i", r, r) / self.q_scale, np.float64)

    def score(self, windows: F32) -> F64:
        """Per window: mean over its samples of T²/k + Q/q_scale."""
        return self.score_rows(windows)[2]

    def score_rows(self, windows: F32) -> tuple[F64, F64, F64]:
        """(rows, row scores, window scores) of ``score``, for a ``learn_rows`` after it."""
        n = windows.shape[0]
        x = self._rows(windows)
        r = self._row_scores(x)
        return x, r, np.asarray(r.reshape(n, -1).mean(axis=1), np.float64)

    def to_state(self) -> dict[str, Any]:
        """Settings and the fitted projection, JSON-ready."""
        return {"key": self.KEY, "n_fields": self.n_fields, "window": self.window,
                "hop": self.hop, "variance": self.variance, "shrinkage": self.shrinkage,
                "trim": self.trim, "passes": self.passes, "features": self.features,
                "center": self.center.tolist(),
                "components": self.components.tolist(), "inv_eig": self.inv_eig.tolist(),
                "q_scale": self.q_scale, "run_mean": self.run_mean.tolist(),
                "run_cov": self.run_cov.tolist(), "run_weight": self.run_weight,
                "typical": self.typical,
                "residual0": self.residual0,
                "q_scale0": self.q_scale0, "learnt": self.learnt}

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
        p.run_mean = np.asarray(d["run_mean"], np.float64).reshape(p.dim)
        p.run_cov = np.asarray(d["run_cov"], np.float64).reshape(p.dim, p.dim)
        p.run_weight, p.typical = float(d["run_weight"]), float(d["typical"])
        p.residual0, p.q_scale0 = float(d["residual0"]), float(d["q_scale0"])
        p.learnt = int(d["learnt"])
        return p


PCA_FEATURES = "summary"
# What the detector does with channels the scaling treats as slow (transform diff).
SLOW_MODES = ("skip", "change")


class PcaDetector:
    """``PcaT2Q`` as a stream's scorer: fitted on the scaled warm-up windows at its end."""

    KEY: ClassVar[str] = "pca"
    scaled = True
    learns = True

    def __init__(self, *, n_fields: int, window: int, hop: int, halflife: float = 0.0,
                 slow: str = "skip") -> None:
        if slow not in SLOW_MODES:
            raise ValueError(f"slow must be one of {SLOW_MODES}, got {slow!r}")
        self.n_fields, self.window, self.hop = int(n_fields), int(window), int(hop)
        self.slow = slow
        # The channels it models (None: all); with slow="skip", the level channels.
        self.channels: npt.NDArray[np.intp] | None = None
        self.pca = PcaT2Q(n_fields=n_fields, window=window, hop=hop, features=PCA_FEATURES)
        self.halflife = float(halflife)  # windows; 0: the warm-up's projection stays
        self.fitted = False
        # The batch ``score`` saw last, one row per window: (windows, rows, row scores).
        self._scored: tuple[F32, F64, F64] | None = None

    def use_transforms(self, transforms: Sequence[str]) -> None:
        """With ``slow="skip"``, model only the level channels (unless every one is slow).

        A slow channel (a temperature) enters the scaled windows by its change within
        each window, and that change is mostly the ramp the machine is on: on SKAB's
        pump the warm-up's few steep ramps set the threshold, and a valve fault's flow
        drop then stays below it; after warm-up, other ramps raise false alarms.
        """
        if len(transforms) != self.n_fields:
            raise ValueError(f"{len(transforms)} transforms for {self.n_fields} fields")
        keep = [j for j, t in enumerate(transforms) if t != "diff"]
        if self.slow == "change" or not keep or len(keep) == self.n_fields:
            self.channels = None
        else:
            self.channels = np.array(keep, np.intp)
        self.pca = PcaT2Q(n_fields=self.n_fields if self.channels is None else len(keep),
                          window=self.window, hop=self.hop, features=PCA_FEATURES)
        self.fitted = False

    def _pick(self, windows: F32) -> F32:
        return windows if self.channels is None else windows[:, :, self.channels]

    def fit(self, windows: F32) -> F32 | None:
        """Fit on the warm-up windows; their out-of-fold scores calibrate the threshold."""
        if windows.shape[0] < 8:
            raise ValueError(f"pca needs at least 8 warm-up windows, got {windows.shape[0]}")
        scores = self.pca.fit_scores(self._pick(windows))
        self.fitted = True
        return scores.astype(np.float32)

    def score(self, windows: F32) -> F32:
        self._scored = None
        if not self.fitted:
            return np.zeros(windows.shape[0], np.float32)
        if self.pca.features == "samples":
            return self.pca.score(self._pick(windows)).astype(np.float32)
        x, r, scores = self.pca.score_rows(self._pick(windows))
        self._scored = (windows, x, r)
        return scores.astype(np.float32)

    def learn(self, windows: F32) -> None:
        """Normal windows move the projection (recursive PCA), if a half-life is set."""
        if self.fitted:
            self.pca.learn(self._pick(windows), self.halflife)

    def learn_masked(self, windows: F32, mask: npt.NDArray[np.bool_]) -> None:
        """``learn(windows[mask])``; for the batch just scored, from the rows and row
        scores its ``score`` made (the projection has not moved since), not again."""
        scored, self._scored = self._scored, None
        if scored is None or scored[0] is not windows or len(scored[1]) != len(mask):
            self.learn(windows[mask])  # another batch, or rows per sample: score anew
        elif self.fitted:
            self.pca.learn_rows(scored[1][mask], scored[2][mask], self.halflife)

    def to_state(self) -> dict[str, Any]:
        return {"fitted": self.fitted, "stream_fields": self.n_fields, "slow": self.slow,
                "channels": None if self.channels is None else self.channels.tolist(),
                **self.pca.to_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        body = {k: v for k, v in state.items()
                if k not in ("fitted", "stream_fields", "channels", "slow")}
        # Saved before slow channels could be left out: it modelled them (as "change").
        saved = state.get("slow", "change")
        if saved != self.slow:
            raise StateError(f"pca state was fitted with pca_slow {saved!r}, the stream now "
                             f"says {self.slow!r}")
        try:
            pca = PcaT2Q.from_state(body)
        except KeyError as e:
            raise StateError(f"pca state lacks {e} (saved by an older version)") from e
        channels = state.get("channels")
        fields = int(state.get("stream_fields", pca.n_fields))
        picked = None if channels is None else np.asarray(channels, np.intp)
        if (fields, pca.window) != (self.n_fields, self.window) or (
                picked is not None and (len(picked) != pca.n_fields
                                        or not np.all((picked >= 0) & (picked < fields)))):
            raise StateError("pca state is for another stream shape")
        self.pca, self.channels, self.fitted = pca, picked, bool(state["fitted"])
