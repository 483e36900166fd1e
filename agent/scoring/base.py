"""The one interface every scorer implements: a model run by a backend, or a detector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["F32", "F64", "Scorer", "StateError", "TransformAware", "halflife_weight"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def halflife_weight(n: float, halflife: float) -> float:
    """Weight of ``n`` new samples in an exponential average with this half-life."""
    return float(1.0 - 0.5 ** (n / halflife))


class StateError(ValueError):
    """A saved state that does not fit this scorer (another shape, kind or schema)."""


@runtime_checkable
class Scorer(Protocol):
    """Scores batches of windows; higher is more anomalous.

    ``scaled``: whether the pipeline hands it z-scored windows (a model trained
    on scaled data) or the raw readings (a detector that keeps its own range).
    ``learns``: whether it has state worth checkpointing (a fixed model has none).
    The pipeline calls ``fit`` once, at the end of warm-up, with the warm-up
    windows (most scorers ignore it), then ``score`` on every batch in stream
    order, and ``learn`` with the windows it judged normal.
    """

    KEY: ClassVar[str]
    scaled: bool
    learns: bool

    def fit(self, windows: F32) -> F32 | None:
        """Learn from the warm-up windows (called once, when warm-up ends).

        May return the scores to calibrate the threshold on (a detector fitted on these
        very windows would score them too well); None: score them with ``score``.
        """

    def score(self, windows: F32) -> F32:
        """(n, window, channels) -> (n,) raw scores, in stream order."""

    def learn(self, windows: F32) -> None:
        """Learn from windows the pipeline judged normal."""

    def to_state(self) -> dict[str, Any]:
        """Explicit state: JSON values and numpy arrays only."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``to_state`` gave; StateError when it does not fit."""


@runtime_checkable
class TransformAware(Protocol):
    """A scorer that wants each channel's transform (level or diff) before ``fit``."""

    def use_transforms(self, transforms: Sequence[str]) -> None:
        """Called once when warm-up ends, with the scaling's transform per channel."""
