"""Episodes: an anomaly is a state with a start and an end, not a one-row event.

An episode opens after ``consecutive`` windows in a row above the threshold,
unless the previous one opened less than ``cooldown_s`` ago (data time). It
closes after ``clear_windows`` windows in a row below ``clear_ratio`` x the
threshold: the hysteresis keeps a score that hovers around the threshold from
opening and closing episodes every few windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.scoring.base import F64

__all__ = ["EpisodeClosed", "EpisodeOpened", "EpisodeRule"]

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class EpisodeOpened:
    episode: int  # per stream, counts up across restarts
    started: float  # end time of the first window above the threshold in this run
    ts: float  # end time of the window that opened it
    score: float  # that window's (smoothed) score
    threshold: float
    index: int  # position in the scored batch


@dataclass(frozen=True)
class EpisodeClosed:
    episode: int
    started: float
    ended: float  # end time of the window that closed it
    duration_s: float
    peak_score: float
    index: int


class EpisodeRule:
    """Turns a stream's scores into episode state and opened/closed events."""

    def __init__(self, consecutive: int = 1, clear_windows: int = 1, clear_ratio: float = 1.0,
                 cooldown_s: float = 0.0, onset_windows: int = 0) -> None:
        self.consecutive = consecutive
        self.clear_windows = clear_windows
        self.clear_ratio = clear_ratio
        self.cooldown_s = cooldown_s
        self.onset_windows = onset_windows
        self._since_low = 0  # windows since the score was last below the clear level
        self.drifting = False  # above the threshold, but it crept there: no episode
        self.active = False
        self.episode = 0  # the current or last episode's number
        self.started = math.nan
        self.peak = 0.0
        self._above = 0
        self._above_since = math.nan
        self._below = 0
        self._last_open = -math.inf

    def reconfigure(self, consecutive: int, clear_windows: int, clear_ratio: float,
                    cooldown_s: float, onset_windows: int = 0) -> None:
        self.consecutive, self.clear_windows = consecutive, clear_windows
        self.clear_ratio, self.cooldown_s = clear_ratio, cooldown_s
        self.onset_windows = onset_windows

    def update(self, scores: F64, threshold: float | None, end_ts: F64
               ) -> tuple[I64, list[EpisodeOpened | EpisodeClosed]]:
        """Per window of a batch (stream order) the open episode's number (0: normal), and
        the episodes it opened and closed."""
        events: list[EpisodeOpened | EpisodeClosed] = []
        if threshold is None:
            return np.zeros(scores.shape[0], dtype=np.int64), events
        clear = threshold * self.clear_ratio
        n = scores.shape[0]
        if (n and not self.active and float(np.maximum.reduce(scores)) <= threshold
                and float(np.minimum.reduce(end_ts)) >= self._last_open):
            # Nothing is open, nothing opens, the clock did not go back (the common case):
            # all the loop below would do is reset the rise and count the windows since the
            # score was last below the clear level. NaN scores or times take the loop.
            since = 0
            for s in reversed(scores.tolist()):
                if s < clear:
                    break
                since += 1
            self._since_low = since if since < n else self._since_low + n
            self._above = 0
            self.drifting = False
            return np.zeros(n, dtype=np.int64), events
        # Python floats and a list: indexing numpy arrays element by element costs more
        # than the rule itself.
        state = [0] * scores.shape[0]
        for i, (s, t) in enumerate(zip(scores.tolist(), end_ts.tolist(), strict=True)):
            if t < self._last_open:
                # The sensor's clock went back (a reset, a bad timestamp): a cooldown
                # measured from the future would silence this stream.
                self._last_open = -math.inf
            self._since_low = 0 if s < clear else self._since_low + 1
            if self.active:
                self.peak = max(self.peak, s)
                self._below = self._below + 1 if s < clear else 0
                if self._below >= self.clear_windows:
                    self.active = False
                    self._above = 0
                    events.append(EpisodeClosed(self.episode, self.started, t,
                                                max(0.0, t - self.started), self.peak, i))
                    state[i] = 0
                    continue
                state[i] = self.episode
                continue
            if s > threshold:
                if self._above == 0:
                    self._above_since = t
                self._above += 1
                # A score that crept up from the clear level over more than onset_windows
                # is the machine drifting, not a fault: no episode until it has been
                # back below the clear level (the scaling follows the drift meanwhile).
                self.drifting = 0 < self.onset_windows < self._since_low - self._above
                if (self._above >= self.consecutive and not self.drifting
                        and t - self._last_open >= self.cooldown_s):
                    self.active = True
                    self.episode += 1
                    self.started = self._above_since
                    self.peak = s
                    self._below = 0
                    self._last_open = t
                    events.append(EpisodeOpened(self.episode, self.started, t, s, threshold, i))
                    state[i] = self.episode
            else:
                self._above = 0
                self.drifting = False
        return np.array(state, dtype=np.int64), events

    def to_state(self) -> dict[str, Any]:
        return {"active": self.active, "episode": self.episode, "started": self.started,
                "peak": self.peak, "above": self._above, "above_since": self._above_since,
                "below": self._below, "last_open": self._last_open,
                "since_low": self._since_low, "drifting": self.drifting}

    def load_state(self, state: dict[str, Any]) -> None:
        self.active, self.episode = bool(state["active"]), int(state["episode"])
        self.started, self.peak = float(state["started"]), float(state["peak"])
        self._above, self._above_since = int(state["above"]), float(state["above_since"])
        self._below, self._last_open = int(state["below"]), float(state["last_open"])
        self._since_low, self.drifting = int(state["since_low"]), bool(state["drifting"])
