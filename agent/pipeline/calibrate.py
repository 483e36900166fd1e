"""Calibration: the one owner of a stream's threshold, score smoothing and calibrated score.

Warm-up scores are kept (reservoir-sampled) and, when warm-up ends, give the
threshold: ``quantile(warm-up scores) x margin`` for ``threshold: auto``, or the
configured number. The level and spread of log scores are tracked: robustly
(median, MAD) over warm-up, then as an exponential average over windows the
episode rule calls normal, each clipped to 3 spreads so one odd window cannot
move it far. An auto threshold moves with that level (``threshold_halflife``;
0 keeps the warm-up threshold). The calibrated score is a logistic of the
distance to the threshold in units of normal spread: 0.5 at the threshold, the
same meaning for every model and device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.scoring.base import F32, F64, StateError

__all__ = ["Calibrator"]

# Raw scores of 0 (a flat line reconstructed perfectly) must still have a log.
LOG_EPS = 1e-9
# Spread of log scores never assumed below this: with a constant warm-up score
# the calibrated score would otherwise jump from 0 to 1 on any change.
LOG_SIGMA_FLOOR = 0.05
# Warm-up scores kept for the threshold and the robust level (reservoir-sampled,
# so a long warm-up on a fast stream cannot grow memory without bound).
WARM_RESERVOIR = 20_000


class Calibrator:
    """Smoothing, threshold and calibrated score for one stream."""

    def __init__(
        self,
        *,
        threshold: float | None,
        quantile: float = 0.999,
        margin: float = 1.5,
        smoothing: float = 1.0,
        halflife: int = 2000,
        seed: int = 0,
        bounded: bool = False,
    ) -> None:
        self.fixed = threshold
        self.quantile = quantile
        self.margin = margin
        self.alpha = smoothing  # EWMA weight of the newest score; 1 = no smoothing
        # Scores already in [0, 1] (a post-processed likelihood): calibrated linearly, with
        # the threshold at 0.5, instead of by their log spread.
        self.bounded = bounded
        self.halflife = halflife
        self._rng = np.random.default_rng(seed)
        self._warm = np.empty(WARM_RESERVOIR, dtype=np.float64)
        self._n_warm = 0
        self.threshold: float | None = threshold
        self.base: float | None = None  # threshold when warm-up ended
        self.mu = 0.0
        self.var = 0.0
        self.mu0: float | None = None
        self.n = 0
        self._ewma: float | None = None

    @property
    def warm(self) -> bool:
        return self.base is None

    @property
    def sigma(self) -> float:
        return max(math.sqrt(self.var), LOG_SIGMA_FLOOR)

    @property
    def adaptive(self) -> bool:
        return self.fixed is None and self.halflife > 0

    def smooth(self, raw: F32 | F64) -> F64:
        """EWMA of the raw scores, carried across batches."""
        out = raw.astype(np.float64)
        a, s = self.alpha, self._ewma
        if a >= 1.0:
            if out.size:
                self._ewma = float(out[-1])
            return out
        for i in range(out.shape[0]):
            s = out[i] if s is None else s + a * (out[i] - s)
            out[i] = s
        self._ewma = s
        return out

    def learn_warm(self, scores: F64) -> None:
        """Keep warm-up scores for the threshold and the robust level."""
        for v in scores:
            if self._n_warm < WARM_RESERVOIR:
                self._warm[self._n_warm] = v
            else:
                j = int(self._rng.integers(0, self._n_warm + 1))
                if j < WARM_RESERVOIR:
                    self._warm[j] = v
            self._n_warm += 1

    def finish_warmup(self) -> None:
        """Set the threshold from the warm-up scores (idempotent)."""
        if self.base is not None:
            return
        w = self._warm[: min(self._n_warm, WARM_RESERVOIR)]
        if self.fixed is not None:
            self.base = self.fixed
        elif w.size == 0:
            # No window ended during warm-up (warmup < window): nothing to learn from.
            self.base = math.inf
        else:
            self.base = float(np.quantile(w, self.quantile)) * self.margin
        if w.size:
            logs = np.log(w + LOG_EPS)
            self.mu = float(np.median(logs))
            self.var = float((1.4826 * np.median(np.abs(logs - self.mu))) ** 2)
            self.n = int(w.size)
        self.mu0 = self.mu
        self.threshold = self.base

    def calibrate(self, scores: F64) -> F32:
        """Calibrated scores in [0, 1]; 0.5 exactly at the threshold, 0 before there is one."""
        thr = self.threshold
        if thr is None or not math.isfinite(thr):
            return np.zeros(scores.shape, dtype=np.float32)
        if self.bounded and 0 < thr < 1:
            s = np.clip(scores, 0.0, 1.0)
            lin = np.where(s <= thr, 0.5 * s / thr, 0.5 + 0.5 * (s - thr) / (1.0 - thr))
            return lin.astype(np.float32)
        z = (np.log(scores + LOG_EPS) - math.log(thr + LOG_EPS)) / self.sigma
        out: F32 = (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)
        return out

    def adapt(self, normal: F64) -> None:
        """Fold scores of windows judged normal; an auto threshold follows their level."""
        if self.halflife <= 0 or normal.size == 0 or self.base is None:
            return
        a = 1.0 - 0.5 ** (1.0 / self.halflife)
        for v in np.log(normal + LOG_EPS):
            if self.n < 2:
                self.mu, self.n = float(v), self.n + 1
                continue
            sd = self.sigma
            d = min(max(v - self.mu, -3 * sd), 3 * sd)
            self.mu += a * d
            self.var = (1 - a) * (self.var + a * d * d)
            self.n += 1
        if self.adaptive and self.mu0 is not None and math.isfinite(self.base) and self.base > 0:
            self.threshold = self.base * math.exp(self.mu - self.mu0)

    def reconfigure(self, threshold: float | None, quantile: float, margin: float) -> None:
        """A reloaded alert config: a fixed threshold, or auto re-derived from warm-up."""
        self.fixed, self.quantile, self.margin = threshold, quantile, margin
        if self.base is None:
            self.threshold = threshold
            return
        self.base = None
        self.finish_warmup()

    def rebase(self, threshold: float, log_level: float, log_spread: float) -> None:
        """Another model now scores the stream: its threshold and score level replace ours."""
        self.base = self.threshold = threshold
        if self.fixed is not None:
            self.fixed = threshold
        self.mu = self.mu0 = log_level
        self.var = log_spread**2
        self.n = max(self.n, 2)
        self._ewma = None

    def level(self) -> float | None:
        """The typical normal score (exp of the tracked log level)."""
        return math.exp(self.mu) if self.n else None

    def to_state(self) -> dict[str, Any]:
        n = min(self._n_warm, WARM_RESERVOIR)
        return {"warm": self._warm[:n].copy(), "n_warm": self._n_warm,
                "threshold": self.threshold, "base": self.base, "mu": self.mu,
                "var": self.var, "mu0": self.mu0, "n": self.n, "ewma": self._ewma,
                "rng": self._rng.bit_generator.state}

    def load_state(self, state: dict[str, Any]) -> None:
        warm = np.asarray(state["warm"], np.float64)
        if warm.ndim != 1 or warm.size > WARM_RESERVOIR:
            raise StateError("calibrator warm-up scores have the wrong shape")
        self._warm[: warm.size] = warm
        self._n_warm = int(state["n_warm"])
        self.base = state["base"]
        self.threshold = state["threshold"] if self.fixed is None else self.fixed
        self.mu, self.var, self.n = float(state["mu"]), float(state["var"]), int(state["n"])
        self.mu0 = state["mu0"]
        self._ewma = state["ewma"]
        self._rng.bit_generator.state = state["rng"]
