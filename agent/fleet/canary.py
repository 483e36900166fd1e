"""Judging a new model on live windows: the canary before promotion, the watch after.

A ``Trial`` is installed as a stream's ``shadow`` hook: the agent calls it
with every batch of normalised windows it has just scored, under the stream's
lock. It scores the same windows with the other model (the candidate during
the canary, the model it replaced during the watch) and compares:

- every score of the new model is finite;
- its median time per model call is within the latency budget;
- the fraction of windows it scores above the stream's threshold exceeds the
  other model's by no more than the configured bound. Comparing against the
  other model on the same windows is what keeps a real anomaly (both models
  alert) from being mistaken for a broken model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.scoring import ModelSlot, Scorer
from agent.scoring.slot import ShadowBatch

__all__ = ["Trial", "TrialPolicy"]

Windows = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TrialPolicy:
    windows: int
    latency_budget_s: float
    max_alert_rate_increase: float


class Trial:
    """One model's probation on one stream; ``result`` is set once it is decided."""

    def __init__(
        self,
        kind: Literal["canary", "watch"],
        other: Scorer,
        policy: TrialPolicy,
        *,
        convert: Callable[[Windows], Windows] | None = None,
        on_decided: Callable[[], None] = lambda: None,
        on_fail_now: Callable[[ModelSlot], None] | None = None,
        perf: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.kind = kind
        self.other = other  # the candidate (canary) or the replaced model (watch)
        self.policy = policy
        self._convert = convert
        self._on_decided = on_decided
        self._on_fail_now = on_fail_now
        self._perf = perf
        self.windows = 0
        self.new_over = 0
        self.old_over = 0
        self.latencies: list[float] = []
        self.result: Literal["passed", "failed"] | None = None
        self.reason = ""

    def __call__(self, b: ShadowBatch) -> None:
        """The shadow hook: ``b.raw`` and ``b.seconds`` are the stream's own model's."""
        if self.result is not None:
            return
        threshold, windows, scores, seconds = b.threshold, b.windows, b.raw, b.seconds
        x = windows if self._convert is None else self._convert(windows)
        t0 = self._perf()
        other = self.other.score(x)
        other_s = self._perf() - t0
        if self.kind == "canary":
            new, old, new_s = other, scores, other_s
        else:
            new, old, new_s = scores, other, seconds
        n = len(scores)
        self.latencies.append(new_s)
        bad = int(np.count_nonzero(~np.isfinite(new)))
        if bad:
            if self.kind == "watch":
                # Let the alert rule judge this batch by the old model's scores:
                # a broken model must not turn into NaN or inf alerts.
                scores[:] = old
            self._decide("failed", f"{bad} of {n} scores were NaN or infinite")
            if self._on_fail_now is not None:
                self._on_fail_now(b.slot)
            return
        if threshold is None:
            return  # warm-up: no threshold to count against yet; these windows do not count
        self.windows += n
        self.new_over += int(np.count_nonzero(new > threshold))
        self.old_over += int(np.count_nonzero(old > threshold))
        if self.windows >= self.policy.windows:
            self._judge()

    def _judge(self) -> None:
        p = self.policy
        median = statistics.median(self.latencies)
        if median > p.latency_budget_s:
            self._decide("failed", f"median model call took {median * 1e3:.3g} ms, over the "
                                   f"budget of {p.latency_budget_s * 1e3:.3g} ms")
            return
        new_rate = self.new_over / self.windows
        old_rate = self.old_over / self.windows
        if new_rate - old_rate > p.max_alert_rate_increase:
            self._decide("failed", f"{new_rate:.1%} of {self.windows} windows above the "
                                   f"threshold, against {old_rate:.1%} for the other model "
                                   f"(bound +{p.max_alert_rate_increase:.1%})")
            return
        self._decide("passed", f"{self.windows} windows: {new_rate:.1%} above threshold "
                               f"(other model {old_rate:.1%}), median call "
                               f"{median * 1e3:.3g} ms")

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
                "new_over": self.new_over, "old_over": self.old_over}
