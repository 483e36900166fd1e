"""What a stream pipeline emits: typed events for the outbox sink, replay and the live view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.pipeline.drift import DriftEvent
from agent.scoring.base import F32, F64

__all__ = ["Drift", "Episode", "Event", "ScoreBatch", "Summary"]


@dataclass(frozen=True)
class Episode:
    """An episode opened (``alert``) or closed (``resolved``)."""

    kind: Literal["alert", "resolved"]
    stream: str
    episode: int
    ts: float  # end time of the window that opened or closed it
    started: float
    score: float  # the opening window's smoothed score; the peak when resolved
    threshold: float
    anomaly_score: float  # calibrated, in [0, 1]
    model: str
    model_version: int
    window: int
    ended: float | None = None
    duration_s: float | None = None
    relearned: bool = False  # resolved: it lasted adapt.relearn_after_s and was learnt from


@dataclass(frozen=True)
class Summary:
    """A finished tumbling period's aggregate."""

    stream: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Drift:
    stream: str
    ts: float
    drifts: list[DriftEvent]
    detector: str
    threshold: float | None
    model: str
    model_version: int


@dataclass(frozen=True)
class ScoreBatch:
    """One record per scored window of a batch, as arrays (in stream order)."""

    stream: str
    end_ts: F64
    end_index: npt.NDArray[np.int64]  # sample number of each window's last sample (1-based)
    raw: F32  # the scorer's score (after feedback)
    smoothed: F64  # what the threshold is compared with
    anomaly: F32  # calibrated score in [0, 1]; 0 during warm-up
    episode: npt.NDArray[np.int64]  # the open episode's number, 0 when normal
    threshold: float | None
    warm: bool  # a warm-up batch: calibrates, never alerts


Event = Episode | Summary | Drift | ScoreBatch
