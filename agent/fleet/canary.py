"""Judging a new model on live windows: the canary before promotion, the watch after.

A ``Trial`` is installed as a stream's shadow hook (``ModelSlot.shadow``): the
pipeline calls it with every batch of scaled windows it has just scored, under
the stream's lock. It scores the same windows with the other model (the
candidate during the canary, the model it replaced during the watch).

Two models rarely share a score scale, so the candidate is first *calibrated*
on the same windows: on those the live model calls normal, its threshold is put
as many spreads above its typical (log) score as the live threshold sits above
the live model's. Then it must pass, on the judged windows:

- every score finite, and the median model call within the latency budget;
- an absolute bound: of the windows the live model calls normal, the share the
  candidate flags is at most ``max_false_alarms``. This does not depend on
  what the live model is doing: a live stream in the middle of an anomaly does
  not excuse a candidate that flags normal windows;
- a relative bound: the candidate flags at most ``max_alert_rate_increase``
  more of all windows than the live model;
- recall: of the windows the live model flags (when it flagged at least
  ``MIN_FLAGGED``), the candidate flags at least ``min_recall``, so a model
  that saturates on faults does not slip through;
- agreement: on the windows the live model calls normal, the candidate's
  scores rise and fall with the live model's (rank correlation at least
  ``min_agreement``), so a model that tracks nothing the live one sees, such as
  a constant output, is refused even when an anomaly makes every score rise.

A trial that has not seen enough windows the live model calls normal keeps
going, up to ``EXTEND`` times its length, and then fails: it cannot be judged.
On a pass, ``calibration`` holds the candidate's threshold and score level, and
the manager installs it with the model, so the stream keeps its alert rate.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.scoring import ModelSlot, Scorer
from agent.scoring.slot import Calibration, ShadowBatch

__all__ = ["Trial", "TrialPolicy"]

Windows = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
LOG_EPS = 1e-9
# A trial short of windows the live model calls normal runs up to this many times longer.
EXTEND = 5
# Fewest live-normal windows the candidate is calibrated and judged on.
MIN_NORMAL = 20
# Windows the live model must have flagged before the candidate's recall is judged.
MIN_FLAGGED = 10
# Spread of log scores never taken below this (a constant score has no spread).
LOG_SPREAD_FLOOR = 0.05


@dataclass(frozen=True)
class TrialPolicy:
    windows: int
    latency_budget_s: float
    max_alert_rate_increase: float
    max_false_alarms: float = 0.05
    min_agreement: float = 0.3
    min_recall: float = 0.5


def _level(scores: F64) -> tuple[float, float]:
    """Median and MAD-spread of log scores."""
    logs = np.log(np.maximum(scores, 0.0) + LOG_EPS)
    med = float(np.median(logs))
    return med, max(1.4826 * float(np.median(np.abs(logs - med))), LOG_SPREAD_FLOOR)


def _ranks(x: F64) -> F64:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    return r


def rank_correlation(a: F64, b: F64) -> float:
    """Spearman's rho (ties broken by order); 0 when either side is constant."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


class Trial:
    """One model's probation on one stream; ``result`` is set once it is decided."""

    def __init__(
        self,
        kind: Literal["canary", "watch"],
        other: Scorer,
        policy: TrialPolicy,
        *,
        reference: Calibration | None = None,
        convert: Callable[[Windows], Windows] | None = None,
        on_decided: Callable[[], None] = lambda: None,
        on_fail_now: Callable[[ModelSlot], None] | None = None,
        perf: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.kind = kind
        self.other = other  # the candidate (canary) or the replaced model (watch)
        self.policy = policy
        # The watch judges the replaced model against its own (pre-swap) calibration.
        self.reference = reference
        self._convert = convert
        self._on_decided = on_decided
        self._on_fail_now = on_fail_now
        self._perf = perf
        self.windows = 0
        self._new: list[F64] = []
        self._old: list[F64] = []
        self._thr: list[F64] = []
        self.latencies: list[float] = []
        self.result: Literal["passed", "failed"] | None = None
        self.reason = ""
        self.calibration: Calibration | None = None  # the candidate's, once passed
        self.live_calibration: Calibration | None = None  # the live model's, measured
        self.stats: dict[str, float] = {}

    def __call__(self, b: ShadowBatch) -> None:
        """The shadow hook: ``b.raw`` and ``b.seconds`` are the stream's own model's."""
        if self.result is not None:
            return
        x = b.windows if self._convert is None else self._convert(b.windows)
        t0 = self._perf()
        other = self.other.score(x)
        other_s = self._perf() - t0
        if self.kind == "canary":
            new, old, new_s = other, b.raw, other_s
        else:
            new, old, new_s = b.raw, other, b.seconds
        n = len(b.raw)
        self.latencies.append(new_s)
        bad = int(np.count_nonzero(~np.isfinite(new)))
        if bad:
            if self.kind == "watch":
                # Let the stream judge this batch by the old model's scores: a broken
                # model must not turn into NaN or inf alerts.
                b.raw[:] = old
            self._decide("failed", f"{bad} of {n} scores were NaN or infinite")
            if self._on_fail_now is not None:
                self._on_fail_now(b.slot)
            return
        if b.threshold is None or not math.isfinite(b.threshold):
            return  # warm-up: nothing to calibrate against yet; these windows do not count
        self.windows += n
        self._new.append(np.asarray(new, np.float64).copy())
        self._old.append(np.asarray(old, np.float64).copy())
        self._thr.append(np.full(n, b.threshold))
        if self.windows >= self.policy.windows:
            self._judge()

    def _judge(self) -> None:
        p = self.policy
        median = statistics.median(self.latencies)
        if median > p.latency_budget_s:
            self._decide("failed", f"median model call took {median * 1e3:.3g} ms, over the "
                                   f"budget of {p.latency_budget_s * 1e3:.3g} ms")
            return
        if self.kind == "watch" and self.reference is None:
            # Promoted without a canary: no calibration of the old model to judge rates by.
            self._decide("passed", f"{self.windows} windows, every score finite, median "
                                   f"call {median * 1e3:.3g} ms")
            return
        new, old = np.concatenate(self._new), np.concatenate(self._old)
        thr = np.concatenate(self._thr)
        ref_thr = thr if self.reference is None else np.full(len(old), self.reference.threshold)
        live_normal = old <= ref_thr
        k = int(live_normal.sum())
        if k < max(MIN_NORMAL, p.windows // 4):
            if self.windows < EXTEND * p.windows:
                return  # keep watching until the live model sees normal windows again
            self._decide("failed", f"the live model called only {k} of {self.windows} "
                                   "windows normal: too few to judge the new model on")
            return
        lo_med, lo_spread = _level(old[live_normal])
        ln_med, ln_spread = _level(new[live_normal])
        self.live_calibration = Calibration(float(np.median(ref_thr)), lo_med, lo_spread)
        if self.kind == "canary":
            z = (math.log(float(np.median(thr)) + LOG_EPS) - lo_med) / lo_spread
            new_thr = math.exp(ln_med + z * ln_spread)
        else:
            new_thr = float(np.median(thr))
        false_alarms = float(np.mean(new[live_normal] > new_thr))
        flagged = ~live_normal
        # Of the windows the live model flags, the share the candidate flags too: a model
        # that follows normal windows but saturates on faults would otherwise pass.
        recall = float(np.mean(new[flagged] > new_thr)) if flagged.sum() >= MIN_FLAGGED else 1.0
        new_rate = float(np.mean(new > new_thr))
        old_rate = float(np.mean(old > ref_thr))
        # On normal windows: during an anomaly any two models' scores rise together, so
        # agreement there says nothing about whether the candidate sees what the live one does.
        agreement = rank_correlation(new[live_normal], old[live_normal])
        self.stats = {"windows": float(self.windows), "live_normal": float(k),
                      "false_alarms": false_alarms, "recall": recall, "new_rate": new_rate,
                      "old_rate": old_rate, "agreement": agreement, "threshold": new_thr}
        if false_alarms > p.max_false_alarms:
            self._decide("failed", f"it flags {false_alarms:.1%} of the {k} windows the live "
                                   f"model calls normal (bound {p.max_false_alarms:.1%})")
        elif new_rate - old_rate > p.max_alert_rate_increase:
            self._decide("failed", f"{new_rate:.1%} of {self.windows} windows above its "
                                   f"threshold, against {old_rate:.1%} for the live model "
                                   f"(bound +{p.max_alert_rate_increase:.1%})")
        elif recall < p.min_recall:
            self._decide("failed", f"it flags only {recall:.1%} of the {int(flagged.sum())} "
                                   f"windows the live model flags (bound {p.min_recall:.0%})")
        elif agreement < p.min_agreement:
            self._decide("failed", f"its scores do not follow the live model's (rank "
                                   f"correlation {agreement:.2f} < {p.min_agreement:.2f})")
        else:
            self.calibration = Calibration(new_thr, ln_med, ln_spread)
            self._decide("passed", f"{self.windows} windows: {new_rate:.1%} above its "
                                   f"threshold (live {old_rate:.1%}), {false_alarms:.1%} of "
                                   f"live-normal windows flagged, rank correlation "
                                   f"{agreement:.2f}, median call {median * 1e3:.3g} ms")

    def fail(self, slot: ModelSlot, reason: str) -> None:
        """The trial broke (its model raised): fail it, and in a watch restore the old model."""
        if self.result is not None:
            return
        self._decide("failed", reason)
        if self._on_fail_now is not None:
            self._on_fail_now(slot)

    def _decide(self, result: Literal["passed", "failed"], reason: str) -> None:
        self.reason = reason
        self.result = result
        self._on_decided()

    def summary(self) -> dict[str, object]:
        return {"windows": self.windows, "of": self.policy.windows,
                **{k: round(v, 4) for k, v in self.stats.items()}}
