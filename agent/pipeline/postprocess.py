"""Post-processing of per-window raw anomaly scores: likelihood, range rule, rest period.

Each stage works on arrays of scores in stream order, keeps its own bounded state, and
round-trips through `to_state()/from_state()` so a restarted agent continues identically.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

_LOG_1E10 = math.log(1e-10)


class AnomalyLikelihood:
    """HTM-style likelihood: tail probability of a short average of the raw score, log-scaled.

    A Gaussian is fitted to the history of the short averages (mean and variance floored, so a
    detector that is nearly always 0 does not make every blip improbable) and refitted every
    `refit_every` windows. The output is log(tail) / log(1e-10) clipped to [0, 1]: 0.5 means a
    tail probability of 1e-5.
    """

    def __init__(self, *, avg_window: int = 10, history: int = 8640, refit_every: int = 100,
                 mean_floor: float = 0.03, var_floor: float = 0.0003) -> None:
        self.avg_window, self.history, self.refit_every = avg_window, history, refit_every
        self.mean_floor, self.var_floor = mean_floor, var_floor
        self.recent: F64 = np.zeros(avg_window)  # ring of the last raw scores
        self.ring: F64 = np.zeros(history)  # ring of short averages
        self.n = 0  # raw scores seen
        self.mean = float("nan")  # nan until the first fit
        self.std = float("nan")

    def process(self, raw: F64) -> F64:
        """Likelihood score in [0, 1] per raw score; 0 until the first fit."""
        raw = np.asarray(raw, np.float64)
        out = np.zeros(raw.shape[0])
        for k, r in enumerate(raw):
            self.recent[self.n % self.avg_window] = r if math.isfinite(r) else 0.0
            self.n += 1
            avg = float(self.recent[: min(self.n, self.avg_window)].mean())
            self.ring[(self.n - 1) % self.history] = avg
            if self.n % self.refit_every == 0:
                h = self.ring[: min(self.n, self.history)]
                self.mean = max(float(h.mean()), self.mean_floor)
                self.std = math.sqrt(max(float(h.var()), self.var_floor))
            if math.isnan(self.mean) or avg <= self.mean:
                continue
            tail = 0.5 * math.erfc((avg - self.mean) / (self.std * math.sqrt(2.0)))
            out[k] = min(math.log(max(tail, 1e-300)) / _LOG_1E10, 1.0)
        return out

    def to_state(self) -> dict[str, Any]:
        """Parameters and history."""
        return {"avg_window": self.avg_window, "history": self.history,
                "refit_every": self.refit_every, "mean_floor": self.mean_floor,
                "var_floor": self.var_floor, "recent": self.recent.copy(),
                "ring": self.ring.copy(), "n": self.n, "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AnomalyLikelihood:
        """Rebuild from `to_state()` output."""
        obj = cls(avg_window=int(state["avg_window"]), history=int(state["history"]),
                  refit_every=int(state["refit_every"]), mean_floor=float(state["mean_floor"]),
                  var_floor=float(state["var_floor"]))
        obj.recent = np.asarray(state["recent"], np.float64).copy()
        obj.ring = np.asarray(state["ring"], np.float64).copy()
        obj.n, obj.mean, obj.std = int(state["n"]), float(state["mean"]), float(state["std"])
        return obj


class RangeRule:
    """Lifts the score to 1 when a new value leaves the range seen so far by more than `frac`."""

    def __init__(self, *, frac: float = 0.1) -> None:
        self.frac = frac
        self.lo = float("nan")
        self.hi = float("nan")

    def process(self, newest: F64) -> F64:
        """1.0 where a window's newest value(s) break the running range, else 0; widens it."""
        v = np.asarray(newest, np.float64)
        v = v.reshape(v.shape[0], -1)
        out = np.zeros(v.shape[0])
        for k in range(v.shape[0]):
            row = v[k][np.isfinite(v[k])]
            if row.size == 0:
                continue
            a, b = float(row.min()), float(row.max())
            if math.isnan(self.lo):
                self.lo, self.hi = a, b
                continue
            margin = self.frac * (self.hi - self.lo)
            if a < self.lo - margin or b > self.hi + margin:
                out[k] = 1.0
            self.lo, self.hi = min(self.lo, a), max(self.hi, b)
        return out

    def to_state(self) -> dict[str, Any]:
        """Fraction and running range."""
        return {"frac": self.frac, "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RangeRule:
        """Rebuild from `to_state()` output."""
        obj = cls(frac=float(state["frac"]))
        obj.lo, obj.hi = float(state["lo"]), float(state["hi"])
        return obj


class RestPeriod:
    """Zeroes the `windows` scores after one that reaches `trigger`: one alert per event."""

    def __init__(self, *, windows: int, trigger: float) -> None:
        self.windows, self.trigger = windows, trigger
        self.left = 0  # windows still to suppress

    def process(self, score: F64) -> F64:
        """The scores with the rest periods applied."""
        out = np.asarray(score, np.float64).copy()
        for k in range(out.shape[0]):
            if self.left > 0:
                self.left -= 1
                out[k] = 0.0
            elif out[k] >= self.trigger:
                self.left = self.windows
        return out

    def to_state(self) -> dict[str, Any]:
        """Parameters and the suppression still pending."""
        return {"windows": self.windows, "trigger": self.trigger, "left": self.left}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RestPeriod:
        """Rebuild from `to_state()` output."""
        obj = cls(windows=int(state["windows"]), trigger=float(state["trigger"]))
        obj.left = int(state["left"])
        return obj


class PostProcessor:
    """Raw detector scores -> final score in [0, 1]: likelihood, range rule, rest period.

    The first `warmup_windows` windows only teach the stages (range, likelihood history) and
    score 0. Defaults are the shipped single-channel config (alert threshold 0.45 = `trigger`).
    With `likelihood=False` the raw score is used as is (give it in [0, 1]).
    """

    def __init__(self, *, likelihood: bool = True, rest_windows: int = 120,
                 range_rule: bool = True, warmup_windows: int = 0, trigger: float = 0.45,
                 range_frac: float = 0.1,
                 likelihood_params: dict[str, Any] | None = None) -> None:
        self.warmup_windows = warmup_windows
        self.seen = 0
        self.likelihood = AnomalyLikelihood(**(likelihood_params or {})) if likelihood else None
        self.range_rule = RangeRule(frac=range_frac) if range_rule else None
        self.rest = RestPeriod(windows=rest_windows, trigger=trigger) if rest_windows > 0 else None
        self.trigger = trigger

    def process(self, raw: F64, newest_values: F64 | None = None) -> F64:
        """Final score per window in stream order; `newest_values` feeds the range rule."""
        raw = np.nan_to_num(np.asarray(raw, np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        n = raw.shape[0]
        warm = np.clip(self.warmup_windows - self.seen - np.arange(n), 0, None) > 0
        self.seen += n
        score = self.likelihood.process(raw) if self.likelihood is not None else raw.copy()
        if self.range_rule is not None:
            if newest_values is None:
                raise ValueError("the range rule needs each window's newest value(s)")
            score = np.maximum(score, self.range_rule.process(newest_values))
        score[warm] = 0.0
        if self.rest is not None:
            score = self.rest.process(score)
        return score

    def to_state(self) -> dict[str, Any]:
        """Every stage's state."""
        return {"warmup_windows": self.warmup_windows, "seen": self.seen, "trigger": self.trigger,
                "likelihood": None if self.likelihood is None else self.likelihood.to_state(),
                "range_rule": None if self.range_rule is None else self.range_rule.to_state(),
                "rest": None if self.rest is None else self.rest.to_state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PostProcessor:
        """Rebuild from `to_state()` output."""
        obj = cls(likelihood=False, rest_windows=0, range_rule=False,
                  warmup_windows=int(state["warmup_windows"]), trigger=float(state["trigger"]))
        obj.seen = int(state["seen"])
        if state["likelihood"] is not None:
            obj.likelihood = AnomalyLikelihood.from_state(state["likelihood"])
        if state["range_rule"] is not None:
            obj.range_rule = RangeRule.from_state(state["range_rule"])
        if state["rest"] is not None:
            obj.rest = RestPeriod.from_state(state["rest"])
        return obj
