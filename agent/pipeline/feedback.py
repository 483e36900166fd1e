"""Operator feedback: labels on recent windows push similar windows' scores down or up."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from agent.scoring.base import F32, F64, StateError

__all__ = ["FEEDBACK_HISTORY", "LAZY_WINDOW_BYTES", "FeedbackHead", "window_summaries"]

# Feedback labels must name a window this recent (windows remembered).
FEEDBACK_HISTORY = 512
# Windows up to this size are kept whole and summarised only if labelled; larger ones are
# summarised at once, so the history stays within FEEDBACK_HISTORY x this many bytes.
LAZY_WINDOW_BYTES = 4096
LOG_EPS = 1e-9


def window_summaries(windows: F32 | F64) -> F64:
    """(n, window, channels) scaled windows -> (n, 2 x channels) mean and spread."""
    mean = windows.mean(axis=1, dtype=np.float64)
    std = windows.std(axis=1, dtype=np.float64)
    out: F64 = np.concatenate([mean, std], axis=1)
    return out


class FeedbackHead:
    """Labelled windows become prototypes; windows near one score like it was labelled."""

    def __init__(self, radius: float = 1.5, weight: float = 1.0, max_labels: int = 64) -> None:
        self.radius = radius
        self.weight = weight
        self.max_labels = max_labels
        # Batches of (end times, scaled windows or their summaries): at least the last
        # FEEDBACK_HISTORY windows.
        self._recent: deque[tuple[F64, F32 | F64]] = deque()
        self._held = 0  # windows in _recent
        self.prototypes: deque[tuple[F64, bool]] = deque(maxlen=max_labels)  # (summary, anomaly)
        self.labels = {"normal": 0, "anomaly": 0}

    def remember(self, end_ts: F64, windows: F32) -> None:
        """Keep a batch of scaled windows that a label may name later.

        Small windows are kept whole (copied) and summarised only when labelled: at a
        million samples a second, a summary per window costs more than the scoring.
        """
        kept = (windows.copy() if windows[:1].nbytes <= LAZY_WINDOW_BYTES
                else window_summaries(windows))
        self._recent.append((end_ts.copy(), kept))
        self._held += end_ts.shape[0]
        while self._held - self._recent[0][0].shape[0] >= FEEDBACK_HISTORY:
            self._held -= self._recent.popleft()[0].shape[0]

    def _window_times(self) -> F64:
        """End times of the last ``FEEDBACK_HISTORY`` windows remembered, oldest first."""
        ts: F64 = np.concatenate([t for t, _ in self._recent])[-FEEDBACK_HISTORY:]
        return ts

    def label(self, ts: float, label: str) -> bool:
        """Turn the remembered window whose end is nearest ``ts`` into a prototype."""
        if label not in self.labels:
            raise ValueError(f"label must be 'normal' or 'anomaly', got {label!r}")
        if not self._recent:
            return False
        times = self._window_times()
        if not times[0] - 1.0 <= ts <= times[-1] + 1.0:
            return False
        # The first of equally near windows, counted back from the newest.
        back = times.shape[0] - int(np.argmin(np.abs(times - ts)))
        for end_ts, kept in reversed(self._recent):
            if back <= end_ts.shape[0]:
                one = kept[-back:][:1]
                summary = window_summaries(one)[0] if one.ndim == 3 else one[0].copy()
                break
            back -= end_ts.shape[0]
        self.prototypes.append((summary, label == "anomaly"))
        self.labels[label] += 1
        return True

    def adjust(self, raw: F32 | F64, summaries: F64, normal_level: float) -> F64:
        """Raw scores after the labels: a window identical to a confirmed false alarm
        scores like a normal window (``weight`` 1), one like a confirmed anomaly up to
        (1 + weight) x higher; the effect fades with distance (``radius``)."""
        out = raw.astype(np.float64).copy()
        for proto, anomaly in self.prototypes:
            if proto.shape[0] != summaries.shape[1]:
                continue
            d = np.sqrt(np.mean((summaries - proto) ** 2, axis=1))
            sim = self.weight * np.exp(-((d / self.radius) ** 2))
            if anomaly:
                out *= 1.0 + sim
            else:
                # Geometric blend towards the normal level: scores span decades, and a
                # linear blend would leave a 100x score well above any threshold.
                low = np.minimum(out, max(normal_level, LOG_EPS))
                out = np.exp((1.0 - sim) * np.log(out + LOG_EPS) + sim * np.log(low + LOG_EPS))
        return out

    def to_state(self) -> dict[str, Any]:
        protos = list(self.prototypes)
        width = protos[0][0].shape[0] if protos else 0
        arr = np.array([p for p, _ in protos], np.float64).reshape(len(protos), width)
        return {"labels": dict(self.labels), "prototypes": arr,
                "anomaly": np.array([a for _, a in protos], bool)}

    def load_state(self, state: dict[str, Any]) -> None:
        protos = np.asarray(state["prototypes"], np.float64)
        kinds = np.asarray(state["anomaly"], bool)
        if protos.ndim != 2 or protos.shape[0] != kinds.shape[0]:
            raise StateError("feedback prototypes have the wrong shape")
        self.labels = {k: int(state["labels"].get(k, 0)) for k in ("normal", "anomaly")}
        self.prototypes.clear()
        for p, a in zip(protos, kinds, strict=True):
            self.prototypes.append((p.copy(), bool(a)))
