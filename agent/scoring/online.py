"""Single-channel detectors that learn as they score, behind the common scorer interface."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np

from agent.scoring.base import F32, F64, StateError

__all__ = ["OnlineDetector"]


class _Learner(Protocol):
    KEY: ClassVar[str]

    def score(self, windows: F32) -> F64: ...

    def to_state(self) -> dict[str, Any]: ...


class OnlineDetector:
    """Wraps a detector with ``score``/``to_state``/``from_state`` (wgauss, artime, knn).

    It reads raw values (it keeps its own range, widened online), sees every window in
    stream order, warm-up included, and learns from each as it scores it.
    """

    KEY: ClassVar[str] = "online"
    scaled = False
    learns = True

    def __init__(self, detector: _Learner) -> None:
        self.detector = detector

    def fit(self, windows: F32) -> None:
        """Nothing to fit: it learnt from the warm-up windows as it scored them."""

    def score(self, windows: F32) -> F32:
        return np.asarray(self.detector.score(windows), dtype=np.float32)

    def learn(self, windows: F32) -> None:
        """Nothing more: score() already learnt from every window."""

    def to_state(self) -> dict[str, Any]:
        return {"detector": self.detector.KEY, **self.detector.to_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("detector") != self.detector.KEY:
            raise StateError(f"state of detector {state.get('detector')!r}, stream runs "
                             f"{self.detector.KEY!r}")
        body = {k: v for k, v in state.items() if k != "detector"}
        self.detector = type(self.detector).from_state(body)  # type: ignore[attr-defined]
