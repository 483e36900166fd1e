"""Per-stream ring buffers that turn a stream of readings into windows.

The buffer is allocated once; readings are written in place. A window of
``window`` samples becomes ready every ``hop`` samples. The consumer (the
inference thread) copies ready windows out in micro-batches. When it falls
behind by more than the buffer holds, the oldest unread windows are
overwritten: the overflow policy is *drop oldest*, and every dropped window is
counted in ``windows_dropped``.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

__all__ = ["RingBuffer"]

FloatArray = npt.NDArray[np.float32]


class RingBuffer:
    """Fixed-size (capacity x channels) float32 ring with sample timestamps.

    Writers (the MQTT thread) and the reader (the inference thread) share it
    under one lock held only for the copy.
    """

    def __init__(self, capacity: int, channels: int, window: int, hop: int) -> None:
        if not 1 <= hop <= window <= capacity:
            raise ValueError(f"need 1 <= hop ({hop}) <= window ({window}) <= capacity ({capacity})")
        self.capacity = capacity
        self.channels = channels
        self.window = window
        self.hop = hop
        self._data = np.zeros((capacity, channels), dtype=np.float32)
        self._bytes = self._data.data.cast("B")
        self._row = struct.Struct(f"={channels}f")  # native, like the array
        self._ts = np.zeros(capacity, dtype=np.float64)
        self._offsets = np.arange(window, dtype=np.int64)
        # k * hop for every window the buffer can hold at once
        self._hops = np.arange(capacity // hop + 2, dtype=np.int64) * hop
        # Every window that does not cross the wrap point, by its first row: a read
        # slices it (one C call) instead of building a strided view each time.
        item = self._data.itemsize
        self._starts = as_strided(self._data, shape=(capacity - window + 1, window, channels),
                                  strides=(channels * item, channels * item, item),
                                  writeable=False)
        self._lock = threading.Lock()
        self.total = 0  # samples ever written; the write position is total % capacity
        self._next_end = window  # sample count at which the next unread window ends
        self.windows_dropped = 0
        self.samples_overwritten = 0

    # -- writers ---------------------------------------------------------------

    def append(self, ts: float, values: Sequence[float]) -> int:
        """Write one reading; return how many windows are ready (an upper bound)."""
        with self._lock:
            i = self.total % self.capacity
            try:  # struct packs a row of Python floats in half numpy's time, the same bits
                self._row.pack_into(self._bytes, i * self._row.size, *values)
            except (struct.error, OverflowError, TypeError):
                self._data[i] = values  # numpy's own answer: inf past float32, or its error
            self._ts[i] = ts
            self.total += 1
            if self.total < self._next_end:
                return 0
            return (self.total - self._next_end) // self.hop + 1

    def extend(self, ts: npt.ArrayLike, values: npt.ArrayLike) -> int:
        """Write a frame of readings (n,) timestamps and (n, channels) values.

        A frame longer than the buffer keeps only its last ``capacity`` samples;
        the windows that fall out are counted as dropped. Returns how many
        windows are ready (an upper bound).
        """
        ts_arr = np.asarray(ts, dtype=np.float64)
        val_arr = np.asarray(values, dtype=np.float32)
        n = ts_arr.shape[0]
        if val_arr.shape != (n, self.channels):
            raise ValueError(f"frame shape {val_arr.shape} != ({n}, {self.channels})")
        with self._lock:
            skip = max(0, n - self.capacity)
            if skip:
                self.total += skip
                self.samples_overwritten += skip
                ts_arr, val_arr, n = ts_arr[skip:], val_arr[skip:], n - skip
            start = self.total % self.capacity
            first = min(n, self.capacity - start)
            self._data[start:start + first] = val_arr[:first]
            self._ts[start:start + first] = ts_arr[:first]
            if first < n:
                self._data[: n - first] = val_arr[first:]
                self._ts[: n - first] = ts_arr[first:]
            self.total += n
            if self.total < self._next_end:
                return 0
            return (self.total - self._next_end) // self.hop + 1

    # -- reader ----------------------------------------------------------------

    def ready(self) -> int:
        """Windows that can be read now (after accounting for overwritten ones)."""
        with self._lock:
            self._drop_overwritten()
            if self.total < self._next_end:
                return 0
            return (self.total - self._next_end) // self.hop + 1

    def _drop_overwritten(self) -> None:
        oldest = self.total - self.capacity  # first sample index still in the buffer
        start = self._next_end - self.window
        if start < oldest:
            # Skip to the first window whose start is still in the buffer.
            lost = -(-(oldest - start) // self.hop)
            self._next_end += lost * self.hop
            self.windows_dropped += lost

    def read(
        self,
        out: FloatArray,
        end_ts: npt.NDArray[np.float64],
        end_index: npt.NDArray[np.int64],
        max_windows: int,
    ) -> int:
        """Copy up to ``max_windows`` ready windows into ``out[k]`` (window, channels).

        ``end_ts[k]`` receives the timestamp of window k's last sample and
        ``end_index[k]`` its sample number (1-based: the first window of a
        stream ends at ``window``). Returns the number of windows copied; they
        are consumed.
        """
        with self._lock:
            self._drop_overwritten()
            if self.total < self._next_end:
                return 0
            n = min(max_windows, (self.total - self._next_end) // self.hop + 1,
                    int(out.shape[0]))
            ends = self._next_end + self._hops[:n]
            first = (self._next_end - self.window) % self.capacity
            if first + int(ends[-1] - ends[0]) + self.window <= self.capacity:
                # No wrap: every window is a strided view of the buffer, copied at once,
                # and so are their last samples' times.
                step = self.hop
                out[:n] = self._starts[first:first + (n - 1) * step + 1:step]
                last = first + self.window - 1
                end_ts[:n] = self._ts[last:last + (n - 1) * step + 1:step]
            else:  # one gather for the whole batch: row indices of every window, wrapped
                rows = (ends[:, None] - self.window + self._offsets) % self.capacity
                np.take(self._data, rows, axis=0, out=out[:n])
                np.take(self._ts, (ends - 1) % self.capacity, out=end_ts[:n])
            end_index[:n] = ends
            self._next_end += n * self.hop
            return n

    def latest(self, n: int) -> tuple[npt.NDArray[np.float64], FloatArray]:
        """A copy of the last ``n`` samples (oldest first); for status and tests."""
        with self._lock:
            n = min(n, self.total, self.capacity)
            idx = (np.arange(self.total - n, self.total) % self.capacity)
            return self._ts[idx].copy(), self._data[idx].copy()
