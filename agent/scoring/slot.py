"""A stream's model slot: the one door through which fleet delivery swaps or shadows a model.

The pipeline scores through ``slot.scorer`` under ``slot.lock``; fleet code
swaps the card and scorer, or installs a ``shadow`` hook that sees every
scored batch, under the same lock. Nothing else of the pipeline is exposed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.scoring.base import F32, Scorer
from agent.scoring.card import ModelCard

__all__ = ["Calibration", "ModelSlot", "ShadowBatch", "ShadowHook"]


@dataclass(frozen=True)
class Calibration:
    """A model's threshold and the level and spread of its log scores on normal windows."""

    threshold: float
    log_level: float
    log_spread: float


@dataclass
class ShadowBatch:
    """One batch the live model just scored, as a shadow (canary or watch) sees it."""

    windows: F32  # scaled with the live model's statistics
    raw: F32  # the live model's raw scores; a watch may replace them in place
    seconds: float  # how long the live model call took
    threshold: float | None  # the live raw-score threshold (None during warm-up)
    slot: ModelSlot


ShadowHook = Callable[[ShadowBatch], None]


class ModelSlot:
    """The current card and scorer of one stream, and an optional shadow hook."""

    def __init__(self, stream: str, *, window: int, fields: tuple[str, ...], batch: int,
                 normalise: str, card: ModelCard, scorer: Scorer,
                 lock: threading.RLock | None = None) -> None:
        self.stream = stream
        self.window = window
        self.fields = fields
        self.batch = batch
        self.normalise = normalise
        self.card = card
        self.scorer = scorer
        self.shadow: ShadowHook | None = None
        self.lock = lock if lock is not None else threading.RLock()
        # Set with a swap: the threshold and score level that go with the new model.
        self.calibration: Calibration | None = None
        # Called under the lock by every swap: the stream takes the new card's statistics
        # and calibration at once (a checkpoint between the swap and the next batch must
        # not pair the new model with the old threshold).
        self.on_swap: Callable[[], None] | None = None

    @property
    def is_model(self) -> bool:
        """Whether a delivered model file scores this stream (not a model-free detector)."""
        return self.card.size > 0

    def swap(self, card: ModelCard, scorer: Scorer, calibration: Calibration | None = None
             ) -> tuple[ModelCard, Scorer]:
        """Put another model in (with its calibration); return the one it replaced."""
        with self.lock:
            old = self.card, self.scorer
            self.card, self.scorer = card, scorer
            self.calibration = calibration
            if self.on_swap is not None:
                self.on_swap()
            return old

    def set_shadow(self, hook: ShadowHook | None) -> None:
        with self.lock:
            self.shadow = hook
