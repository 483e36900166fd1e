"""Alert rules: warm-up calibration, threshold, consecutive windows, cooldown."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.config import AlertConfig

__all__ = ["AlertDecision", "AlertRule"]

# Keep at most this many warm-up scores for the auto threshold (a long warm-up
# on a fast stream must not grow memory without bound); reservoir-sampled.
WARMUP_SCORES_MAX = 20_000


@dataclass(frozen=True)
class AlertDecision:
    index: int  # position in the scored batch
    score: float
    threshold: float
    ts: float  # timestamp of the window's last sample


class AlertRule:
    """Turns window scores into alerts for one stream.

    Windows that end within the first ``warmup`` samples only calibrate: with
    ``threshold: auto`` the threshold becomes ``quantile(warm-up scores) x
    margin`` when warm-up ends.
    """

    def __init__(self, cfg: AlertConfig, warmup: int, seed: int = 0) -> None:
        self.cfg = cfg
        self.warmup = warmup
        self.threshold: float | None = None if cfg.threshold == "auto" else float(cfg.threshold)
        self._warm_scores = np.empty(WARMUP_SCORES_MAX, dtype=np.float32)
        self._n_warm = 0
        self._rng = np.random.default_rng(seed)
        self._above = 0
        self._last_alert_ts = -math.inf
        self._warm_done = False
        self.alerts = 0

    def reconfigure(self, cfg: AlertConfig) -> None:
        """Apply a reloaded alert config; an auto threshold is re-derived from warm-up."""
        self.cfg = cfg
        if cfg.threshold != "auto":
            self.threshold = float(cfg.threshold)
        else:
            self.threshold = None
            if self._warm_done:
                self.finish_warmup()

    def _calibrate(self, scores: npt.NDArray[np.float32]) -> None:
        for s in scores:
            if self._n_warm < WARMUP_SCORES_MAX:
                self._warm_scores[self._n_warm] = s
            else:
                j = int(self._rng.integers(0, self._n_warm + 1))
                if j < WARMUP_SCORES_MAX:
                    self._warm_scores[j] = s
            self._n_warm += 1

    def finish_warmup(self) -> None:
        """Set an auto threshold from the warm-up scores seen so far (idempotent)."""
        if self.threshold is not None:
            return
        n = min(self._n_warm, WARMUP_SCORES_MAX)
        if n == 0:
            # No window ended during warm-up (warmup < window): nothing to learn from.
            self.threshold = math.inf
            return
        q = float(np.quantile(self._warm_scores[:n], self.cfg.quantile))
        self.threshold = q * self.cfg.margin

    def update(
        self,
        scores: npt.NDArray[np.float32],
        end_index: npt.NDArray[np.int64],
        end_ts: npt.NDArray[np.float64],
    ) -> list[AlertDecision]:
        """Feed a batch of scores; ``end_index`` is each window's last sample number (1-based)."""
        warm = end_index <= self.warmup
        if warm.any():
            self._calibrate(scores[warm])
        out: list[AlertDecision] = []
        for i in np.flatnonzero(~warm):
            self._warm_done = True
            self.finish_warmup()
            thr = self.threshold
            assert thr is not None
            s = float(scores[i])
            if end_ts[i] < self._last_alert_ts:
                # The sensor's clock went back (a reset, a bad timestamp): a cooldown
                # measured from the future would silence this stream.
                self._last_alert_ts = -math.inf
            if s > thr:
                self._above += 1
                if (self._above >= self.cfg.consecutive
                        and end_ts[i] - self._last_alert_ts >= self.cfg.cooldown_s):
                    self._last_alert_ts = float(end_ts[i])
                    self.alerts += 1
                    out.append(AlertDecision(int(i), s, thr, float(end_ts[i])))
            else:
                self._above = 0
        return out
