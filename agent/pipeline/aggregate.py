"""Tumbling-window summaries per stream: count, mean, min, max, std, p95.

Samples arrive in blocks (the new rows of each scored batch), so the exact
moments are merged per block with numpy (Chan et al.'s parallel update) rather
than per reading. The p95 is exact while a period holds at most
``RESERVOIR_SIZE`` values and estimated from a uniform reservoir sample beyond.
Periods follow the agent's clock (processing time), aligned to multiples of the
period, so a sensor with a wrong clock cannot stall them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.pipeline.features import LazyRng, columns, merge_columns

__all__ = ["Moments", "SummaryAggregator"]

RESERVOIR_SIZE = 4096
# Rows a Moments holds back before merging them in one go: a merge costs a dozen numpy
# calls whatever its size, and a frame's batches bring 64-256 rows at a time.
PENDING_ROWS = 4096


class Moments:
    """count/mean/M2/min/max per column plus a reservoir for quantiles."""

    def __init__(self, columns: int, rng: LazyRng) -> None:
        self.columns = columns
        self._rng = rng
        self._res = np.empty((RESERVOIR_SIZE, columns), dtype=np.float64)
        self.reset()

    def reset(self) -> None:
        self._pending: list[npt.NDArray[Any]] = []
        self._pending_rows = 0
        self.n = 0
        self.mean = np.zeros(self.columns)
        self.m2 = np.zeros(self.columns)
        self.min = np.full(self.columns, np.inf)
        self.max = np.full(self.columns, -np.inf)

    @property
    def count(self) -> int:
        """Values added since the last reset (pending ones merged first)."""
        self._merge()
        return self.n

    def add(self, block: npt.NDArray[Any]) -> None:
        """Add an (m, columns) block (a copy is kept; merged with others later)."""
        m = block.shape[0]
        if m == 0:
            return
        self._pending.append(np.array(block).reshape(m, self.columns))
        self._pending_rows += m
        if self._pending_rows >= PENDING_ROWS:
            self._merge()

    def _merge(self) -> None:
        """Fold the pending blocks into the moments and the reservoir, in their order."""
        if not self._pending:
            return
        pending = self._pending
        b = pending[0] if len(pending) == 1 else np.concatenate(pending)
        self._pending, self._pending_rows = [], 0
        m = b.shape[0]
        cols = columns(b)
        n = merge_columns(self.n, self.mean, self.m2, cols)
        np.minimum(self.min, cols.min(axis=1), out=self.min)
        np.maximum(self.max, cols.max(axis=1), out=self.max)
        # Reservoir: the first RESERVOIR_SIZE values go in directly, later value
        # number i replaces a random slot with probability RESERVOIR_SIZE / (i + 1).
        fit = max(0, min(m, RESERVOIR_SIZE - self.n))
        if fit:
            self._res[self.n:self.n + fit] = b[:fit]
        if fit < m:
            # u * (i + 1) < RESERVOIR_SIZE is the same test as its floor (an integer)
            # being a slot; only the few values that win one are converted.
            slots = self._rng.get().random(m - fit)
            slots *= np.arange(self.n + fit + 1, n + 1, dtype=np.float64)
            keep = np.flatnonzero(slots < RESERVOIR_SIZE)
            if keep.size:
                self._res[slots[keep].astype(np.int64)] = b[fit:][keep]
        self.n = n

    def summary(self, names: Sequence[str]) -> dict[str, dict[str, float | int]]:
        self._merge()
        k = min(self.n, RESERVOIR_SIZE)
        p95 = np.quantile(self._res[:k], 0.95, axis=0) if k else np.full(self.columns, math.nan)
        std = np.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else np.zeros(self.columns)
        return {
            name: {"count": self.n, "mean": _r(self.mean[i]), "min": _r(self.min[i]),
                   "max": _r(self.max[i]), "std": _r(std[i]), "p95": _r(p95[i])}
            for i, name in enumerate(names)
        }


def _r(x: float) -> float:
    return float(f"{float(x):.6g}")


class SummaryAggregator:
    """One stream's current period: its samples, scores and alerts."""

    def __init__(self, fields: Sequence[str], period_s: float, seed: int = 0) -> None:
        self.fields = list(fields)
        self.period_s = period_s
        rng = LazyRng(seed)
        self.samples = Moments(len(fields), rng)
        self.scores = Moments(1, rng)
        self.alerts = 0
        self.windows = 0
        self.first_ts = math.inf
        self.last_ts = -math.inf
        self.start: float | None = None

    @property
    def enabled(self) -> bool:
        return self.period_s > 0

    def _open(self, now: float) -> None:
        if self.start is None:
            self.start = math.floor(now / self.period_s) * self.period_s

    def add_samples(self, block: npt.NDArray[np.float32], now: float) -> None:
        if not self.enabled:
            return
        self._open(now)
        self.samples.add(block)

    def add_scores(self, scores: npt.NDArray[np.float32], end_ts: npt.NDArray[np.float64],
                   alerts: int, now: float) -> None:
        if not self.enabled or scores.shape[0] == 0:
            return
        self._open(now)
        self.scores.add(scores.reshape(-1, 1))
        self.windows += int(scores.shape[0])
        self.alerts += alerts
        self.first_ts = min(self.first_ts, float(np.minimum.reduce(end_ts)))
        self.last_ts = max(self.last_ts, float(np.maximum.reduce(end_ts)))

    def due(self, now: float) -> bool:
        return self.start is not None and now >= self.start + self.period_s

    def flush(self) -> dict[str, Any] | None:
        """The finished period's summary (None if it saw no samples); starts a new period."""
        if self.start is None:
            return None
        body: dict[str, Any] | None = None
        if self.samples.count:
            body = {
                "start": self.start,
                "end": self.start + self.period_s,
                "count": self.samples.n,
                "fields": self.samples.summary(self.fields),
                "score": (self.scores.summary(["score"])["score"] if self.scores.count
                          else None),
                "windows": self.windows,
                "alerts": self.alerts,
                "first_ts": self.first_ts if self.windows else None,
                "last_ts": self.last_ts if self.windows else None,
            }
        self.samples.reset()
        self.scores.reset()
        self.alerts = self.windows = 0
        self.first_ts, self.last_ts = math.inf, -math.inf
        self.start = None
        return body
