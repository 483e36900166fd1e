"""Calibration: the one owner of a stream's score smoothing, threshold and calibrated score.

Smoothing is an EWMA of the log raw score (a geometric mean: one wild window
cannot drag it for long, and the score scales of different models all become
offsets). Warm-up windows' smoothed scores are kept, and when warm-up ends they
give the threshold: with ``threshold: auto``, the ``quantile`` (1: the largest)
of the smoothed warm-up scores times ``margin``, after dropping the scores that
are outliers by median/MAD (``TRIM_K`` robust spreads above the median), so a
short fault inside the warm-up does not lift the threshold over itself. The
first few windows, which carry the EWMA's start-up transient, do not count.

After warm-up the threshold follows the level of the smoothed scores of
windows the episode rule calls normal (``halflife`` windows; 0 keeps the
warm-up threshold), within a factor ``limit`` either way, so a slow fault
cannot teach it to ignore itself. The calibrated score is a logistic of
log(score / threshold): 0.5 at the threshold, the same meaning for every model
and device. Scores that are already in [0, 1] (a post-processed likelihood)
are neither smoothed nor log-scaled: ``bounded`` maps them linearly instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.pipeline.features import LazyRng
from agent.scoring.base import F32, F64, StateError

__all__ = ["Calibrator"]

# Raw scores of 0 (a flat line reconstructed perfectly) must still have a log.
LOG_EPS = 1e-12
_MAD_SIGMA = 1.4826
# Warm-up scores more than this many robust spreads (log scale) above the median
# are taken for a fault inside the warm-up and do not set the threshold.
TRIM_K = 4.0
# Steepness of the calibrated score around the threshold, per unit of log score.
SHARPNESS = 4.0
# Warm-up scores kept (reservoir-sampled beyond this: a long warm-up stays bounded).
WARM_RESERVOIR = 20_000


class Calibrator:
    """Smoothing, threshold and calibrated score for one stream."""

    def __init__(
        self,
        *,
        threshold: float | None,
        quantile: float = 1.0,
        margin: float = 1.15,
        smoothing: float = 0.4,
        halflife: int = 500,
        limit: float = 2.0,
        seed: int = 0,
        bounded: bool = False,
    ) -> None:
        self.fixed = threshold
        self.quantile = quantile
        self.margin = margin
        self.alpha = 1.0 if bounded else smoothing  # EWMA weight of the newest score
        self.halflife = halflife
        self.limit = limit
        self.bounded = bounded
        # The first windows carry the EWMA's start-up transient: they set no threshold.
        self.settle = math.ceil(1.0 / self.alpha) - 1
        self._rng = LazyRng(seed)
        self._warm = np.empty(WARM_RESERVOIR, dtype=np.float64)
        self._n_warm = 0
        self.threshold: float | None = threshold
        self.base: float | None = None  # the threshold when warm-up ended
        self.mu = 0.0  # log level of normal smoothed scores
        self.var = 0.0
        self.mu0: float | None = None
        self.n = 0
        self._ewma: float | None = None  # log domain
        self.rebased = False  # a fleet swap set the threshold: the configured one gives way

    @property
    def warm(self) -> bool:
        return self.base is None

    @property
    def adaptive(self) -> bool:
        return self.fixed is None and self.halflife > 0

    def smooth(self, raw: F32 | F64) -> F64:
        """EWMA of the log raw scores, carried across batches (the raw scores when bounded)."""
        x = np.asarray(raw, dtype=np.float64)
        if self.alpha >= 1.0:
            return x.copy()
        logs = np.log(np.maximum(x, 0.0) + LOG_EPS)
        out: list[float] = []  # a list: writing numpy elements one by one costs more
        a, s = self.alpha, self._ewma
        for v in logs.tolist():
            s = v if s is None else s + a * (v - s)
            out.append(s)
        self._ewma = s
        return np.exp(np.array(out, dtype=np.float64).reshape(logs.shape))

    def learn_warm(self, smoothed: F64) -> None:
        """Keep warm-up windows' smoothed scores (after the start-up transient)."""
        for v in smoothed.tolist():
            k = self._n_warm
            self._n_warm += 1
            if k < self.settle:
                continue
            k -= self.settle
            if k < WARM_RESERVOIR:
                self._warm[k] = v
            else:
                j = int(self._rng.get().integers(0, k + 1))
                if j < WARM_RESERVOIR:
                    self._warm[j] = v

    def _warm_scores(self) -> F64:
        return self._warm[: min(max(self._n_warm - self.settle, 0), WARM_RESERVOIR)]

    def finish_warmup(self) -> None:
        """Set the threshold from the warm-up scores (idempotent)."""
        if self.base is not None:
            return
        w = self._warm_scores()
        if w.size:
            logs = np.log(np.maximum(w, 0.0) + LOG_EPS)
            med = float(np.median(logs))
            sigma = _MAD_SIGMA * float(np.median(np.abs(logs - med)))
            self.mu, self.var, self.n = med, sigma**2, int(w.size)
            kept = logs[logs <= med + TRIM_K * max(sigma, 1e-3)]
        if self.fixed is not None and not self.rebased:
            self.base = self.fixed
        elif w.size == 0:
            # No window ended during warm-up (warmup < window): nothing to learn from.
            self.base = math.inf
        else:
            self.base = float(np.exp(np.quantile(kept, self.quantile))) * self.margin
        self.mu0 = self.mu
        self.threshold = self.base

    @staticmethod
    def log_scores(scores: F64) -> F64:
        """The log of smoothed scores as ``calibrate`` and ``adapt`` take it: worked out once
        per batch, it can be handed to both."""
        logs: F64 = np.maximum(scores, 0.0)
        logs += LOG_EPS
        return np.log(logs, out=logs)

    def calibrate(self, scores: F64, logs: F64 | None = None) -> F32:
        """Calibrated scores in [0, 1]; 0.5 exactly at the threshold, 0 before there is one.

        ``logs``: ``log_scores(scores)``, when the caller has it already.
        """
        thr = self.threshold
        if thr is None or not math.isfinite(thr):
            return np.zeros(scores.shape, dtype=np.float32)
        if self.bounded and 0 < thr < 1:
            s = np.clip(scores, 0.0, 1.0)
            lin = np.where(s <= thr, 0.5 * s / thr, 0.5 + 0.5 * (s - thr) / (1.0 - thr))
            return lin.astype(np.float32)
        # The arithmetic of SHARPNESS * (log(max(s, 0) + eps) - log(thr + eps)), then
        # 1 / (1 + exp(-z)), done in place in one buffer.
        if logs is None:
            z = self.log_scores(scores)
            z -= math.log(thr + LOG_EPS)
        else:
            z = logs - math.log(thr + LOG_EPS)
        z *= SHARPNESS
        # np.minimum/maximum: np.clip's Python wrapper costs more than the arithmetic.
        np.maximum(np.minimum(z, 50.0, out=z), -50.0, out=z)
        np.negative(z, out=z)
        np.exp(z, out=z)
        z += 1.0
        np.divide(1.0, z, out=z)
        out: F32 = z.astype(np.float32)
        return out

    def adapt(self, normal: F64, logs: F64 | None = None) -> None:
        """Fold smoothed scores of windows judged normal; an auto threshold follows them.

        ``logs``: ``log_scores(normal)``, when the caller has it already.
        """
        if self.halflife <= 0 or normal.size == 0 or self.base is None:
            return
        a = 1.0 - 0.5 ** (1.0 / self.halflife)
        mu, var = self.mu, self.var
        for v in (self.log_scores(normal) if logs is None else logs).tolist():
            d = v - mu
            mu += a * d
            var = (1 - a) * (var + a * d * d)
        self.mu, self.var, self.n = mu, var, self.n + int(normal.size)
        if self.adaptive and self.mu0 is not None and math.isfinite(self.base) and self.base > 0:
            shift = min(max(self.mu - self.mu0, -math.log(self.limit)), math.log(self.limit))
            self.threshold = self.base * math.exp(shift)

    def reconfigure(self, threshold: float | None, quantile: float, margin: float) -> None:
        """A reloaded alert config: a fixed threshold, or auto re-derived from warm-up."""
        if (threshold, quantile, margin) == (self.fixed, self.quantile, self.margin):
            return  # nothing of ours changed: keep the adapted threshold and level
        old_margin = self.margin
        self.fixed, self.quantile, self.margin = threshold, quantile, margin
        if self.base is None:
            self.threshold = threshold
            return
        if threshold is None and self._n_warm <= self.settle and math.isfinite(self.base):
            # No warm-up scores of this model (a fleet swap rebased us): scale what we have.
            self.base *= margin / old_margin
            self.threshold = self.base
            return
        mu, var, n = self.mu, self.var, self.n
        self.base = None
        self.finish_warmup()
        self.mu, self.var, self.n = mu, var, n  # the adapted level is still this model's

    def rebase(self, threshold: float, log_level: float, log_spread: float) -> None:
        """Another model now scores the stream: its threshold and score level replace ours.

        A configured fixed threshold was on the old model's scale, so it gives way too
        (and stays replaced across restarts: ``rebased`` is saved).
        """
        self.base = self.threshold = threshold
        self.rebased = True
        self.mu = self.mu0 = log_level
        self.var = log_spread**2
        self.n = max(self.n, 2)
        self._ewma = None
        self._n_warm = 0  # the warm-up scores were the old model's

    def level(self) -> float | None:
        """The typical normal score (exp of the tracked log level)."""
        return math.exp(self.mu) if self.n else None

    def to_state(self) -> dict[str, Any]:
        return {"warm": self._warm_scores().copy(), "n_warm": self._n_warm,
                "threshold": self.threshold, "base": self.base, "mu": self.mu,
                "var": self.var, "mu0": self.mu0, "n": self.n, "ewma": self._ewma,
                "rebased": self.rebased,
                # Never drawn from: its seeded start, which load_state recreates.
                "rng": self._rng.get().bit_generator.state if self._rng.started else None}

    def load_state(self, state: dict[str, Any]) -> None:
        warm = np.asarray(state["warm"], np.float64)
        if warm.ndim != 1 or warm.size > WARM_RESERVOIR:
            raise StateError("calibrator warm-up scores have the wrong shape")
        self._warm[: warm.size] = warm
        self._n_warm = int(state["n_warm"])
        self.base = state["base"]
        self.rebased = bool(state["rebased"])
        keep = self.fixed is None or self.rebased
        self.threshold = state["threshold"] if keep else self.fixed
        self.mu, self.var, self.n = float(state["mu"]), float(state["var"]), int(state["n"])
        self.mu0 = state["mu0"]
        self._ewma = state["ewma"]
        if state["rng"] is not None:
            self._rng.get().bit_generator.state = state["rng"]
