"""Drift: river ADWIN or Page-Hinkley on the log score and on each channel's window mean.

Drift is reported as an event, never as an alert. river.drift is imported when
the first batch is checked (it pulls in scipy.stats, ~65-80 MB RSS), so it is
off by default. The detectors' state is not checkpointed: after a restart they
start from scratch, which at worst delays one drift event.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.scoring.base import F64

__all__ = ["DriftEvent", "DriftMonitor"]

LOG_EPS = 1e-9


@dataclass(frozen=True)
class DriftEvent:
    kind: str  # "score" or "input"
    field: str | None  # the channel, for input drift
    estimate: float  # the detector's estimate of the new mean after the change


class DriftMonitor:
    """One river drift detector on the log score and one per channel's window mean."""

    def __init__(self, fields: Sequence[str], kind: str = "adwin", delta: float = 0.002) -> None:
        self.fields = tuple(fields)
        self.kind = kind
        self.delta = delta
        self._detectors: dict[str, Any] | None = None
        self.detections = 0

    def _make(self) -> Any:
        from river import drift  # noqa: PLC0415  (lazily: scipy.stats, ~80 MB RSS)

        if self.kind == "page_hinkley":
            return drift.PageHinkley(delta=self.delta)
        return drift.ADWIN(delta=self.delta)  # type: ignore[no-untyped-call]

    def update(self, scores: F64, channel_means: F64) -> list[DriftEvent]:
        """One entry per window: its score and (channels,) mean; return drifts seen."""
        if self._detectors is None:
            self._detectors = {k: self._make() for k in ("score", *self.fields)}
        det = self._detectors
        logs = np.log(np.maximum(scores, 0.0) + LOG_EPS)
        events: list[DriftEvent] = []
        for i in range(logs.shape[0]):
            d = det["score"]
            d.update(float(logs[i]))
            if d.drift_detected:
                events.append(DriftEvent("score", None, float(getattr(d, "estimation", 0.0))))
            for j, f in enumerate(self.fields):
                d = det[f]
                v = float(channel_means[i, j])
                d.update(v if math.isfinite(v) else 0.0)
                if d.drift_detected:
                    events.append(DriftEvent("input", f, float(getattr(d, "estimation", 0.0))))
        self.detections += len(events)
        return events
