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
    # Set by each backend's __init__ from its model.
    max_batch: int
    _in_shape: tuple[int, ...]
    _out_shape: tuple[int, ...]

    @abstractmethod
    def __init__(self, path: Path, max_batch: int) -> None: ...

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""
        return self._in_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one output, without the batch dimension."""
        return self._out_shape

    def check_batch(self, batch: npt.NDArray[np.float32]) -> int:
        """The batch's size; ValueError when it is too large or of the wrong shape."""
        n = int(batch.shape[0])
        if n > self.max_batch:
            raise ValueError(f"batch of {n} > max_batch {self.max_batch}")
        if batch.shape[1:] != self._in_shape:
            raise ValueError(f"input shape {batch.shape[1:]} != model's {self._in_shape}")
        return n

    @abstractmethod
    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run the model on a batch of samples."""
