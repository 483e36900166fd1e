"""Per-second rates of monotonically increasing counters, for status and metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping

__all__ = ["RateMeter"]

# Rates are taken over at least this long, so status, STATUS= and scrapes that
# come close together do not turn one burst into a spike.
MIN_INTERVAL_S = 5.0


class RateMeter:
    """Rates over the most recent interval of at least ``min_interval_s`` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self._clock = clock
        self._min_interval = min_interval_s
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._counts: dict[Hashable, float] = {}
        self._rates: dict[Hashable, float] = {}

    def update(self, counts: Mapping[Hashable, float]) -> dict[Hashable, float]:
        """Feed the current counter values; return the latest rates (empty until one interval)."""
        now = self._clock()
        with self._lock:
            if self._t0 is None:
                self._t0, self._counts = now, dict(counts)
            elif now - self._t0 >= self._min_interval:
                dt = now - self._t0
                self._rates = {k: max(0.0, (v - self._counts.get(k, 0.0)) / dt)
                               for k, v in counts.items()}
                self._t0, self._counts = now, dict(counts)
            return dict(self._rates)
