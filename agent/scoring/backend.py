"""The one interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import numpy.typing as npt

__all__ = ["Backend", "BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """The runtime a backend needs is not installed (the message says what to install)."""


class Backend(ABC):
    """Runs one model on float32 batches; quantisation is the backend's business.

    ``predict`` takes a (batch, *input_shape) float32 array and returns a
    (batch, *output_shape) float32 array; a backend must accept any batch up to
    the ``max_batch`` it was opened with. A backend's own options (threads, a
    delegate, execution providers, a precision) are keyword arguments after
    ``max_batch``; the registry (``agent/scoring/registry.py``) maps a stream's
    ``backend_options`` onto them.
    """

    KEY: ClassVar[str]
    # How the registry chose this backend for a stream (check-config prints it).
    selection: str = ""

    @abstractmethod
    def __init__(self, path: Path, max_batch: int) -> None: ...

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""

    @property
    @abstractmethod
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one output, without the batch dimension."""

    @abstractmethod
    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run the model on a batch of samples."""
