"""Features: each channel's transform and robust scaling, learnt on this device's warm-up.

A fleet model is trained on one machine's data; the sensors of another pump sit
at other operating points. With ``normalise: warmup`` the stream learns each
channel's centre and spread from its own warm-up, robustly: the median, and a
spread that is the largest of 1.4826 x MAD, the 5 %-trimmed standard deviation
and a floor (MAD alone is 0 on quantised channels that sit on one value most of
the time, and a short fault in the warm-up must not set the scale).

Slow channels (temperatures follow load and weather for hours) keep drifting
after the warm-up, so their *level* would look anomalous on a healthy machine.
Their windows are de-levelled instead (``diff``: each window's own mean is
subtracted), a stateless per-window transform on the raw samples the ring
holds: what is left is their change within the window, which a fault still
moves. Which channels are slow comes from the model card (the transforms the
model was trained with), the stream's ``transforms`` setting, or, for
``auto``, from the warm-up: a channel is slow when most of its warm-up variance
lies between windows rather than within them.

After warm-up the centre of level channels follows the machine outside
episodes (``adapt.input_halflife`` samples; 0 keeps the warm-up's), so a level
that crept up is the new normal, while inside an episode it stays where it
was: an anomaly never teaches the scaling that it is normal. On SKAB's healthy
pump the accelerometers and the flow rate drift 8-15 warm-up spreads in the
hours after a cold start; the valve faults are abrupt and last minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.scoring.base import F32, F64, StateError, halflife_weight

__all__ = ["SLOW_SHARE", "TRANSFORMS", "LazyRng", "Scaling", "WarmupStash", "columns",
           "merge_columns", "slowness"]

log = logging.getLogger(__name__)

TRANSFORMS = ("level", "diff", "auto")
# A channel is slow when at least this share of its warm-up variance lies between
# windows. White noise scores 1/window. On SKAB's warm-ups the temperatures score
# 0.69-0.99 and every other channel at most 0.62.
SLOW_SHARE = 0.65
_MAD_SIGMA = 1.4826
# Share cut from each tail for the trimmed-spread estimate.
TRIM = 0.05
# The spread is never below this fraction of (1 + |centre|): a channel that never
# moved during warm-up would otherwise turn any change into an infinite z-score.
REL_FLOOR = 1e-6
# Warm-up samples kept for the robust fit; a longer warm-up keeps every k-th block.
WARMUP_SAMPLES_MAX = 50_000


class LazyRng:
    """A seeded numpy Generator made on first use.

    ``numpy.random`` adds about 2 MiB to the agent's RSS, and its only users, the
    reservoirs, draw nothing until one overflows (a busy summary period, a very long
    warm-up): an idle agent, or one fed at sensor rates, never imports it.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._gen: np.random.Generator | None = None

    def get(self) -> np.random.Generator:
        if self._gen is None:
            self._gen = np.random.default_rng(self.seed)
        return self._gen

    @property
    def started(self) -> bool:
        return self._gen is not None


def columns(block: npt.NDArray[Any]) -> F64:
    """An (m, columns) block as a contiguous float64 (columns, m) copy.

    numpy reduces the last, contiguous axis several times faster than the first one
    of a narrow block (a few channels, hundreds of rows), and per-column sums are
    what summaries and scaling need.
    """
    out: F64 = np.ascontiguousarray(block.T, dtype=np.float64)
    return out


def merge_columns(n: int, mean: F64, m2: F64, cols: F64) -> int:
    """Fold a block, given as ``columns(block)``, into count/mean/M2 (Chan et al.), in
    place; the new count."""
    m = int(cols.shape[1])
    if m == 0:
        return n
    mb = cols.sum(axis=1) / m
    total = n + m
    delta = mb - mean
    mean += delta * (m / total)
    d = cols - mb[:, None]
    d *= d
    m2 += d.sum(axis=1) + delta**2 * (n * m / total)
    return total


def slowness(samples: F64, window: int) -> F64:
    """Per channel, the share of variance in window means (1/window: white noise, 1: slow)."""
    x = np.asarray(samples, dtype=np.float64)
    nb = x.shape[0] // window
    if nb < 4:
        raise ValueError(f"need at least {4 * window} samples to judge slowness, got {x.shape[0]}")
    blocks = x[: nb * window].reshape(nb, window, -1)
    total = blocks.reshape(nb * window, -1).var(axis=0)
    between = blocks.mean(axis=1).var(axis=0)
    return np.asarray(np.where(total > 0, between / np.maximum(total, 1e-300), 0.0), np.float64)


class Scaling:
    """Per-channel transform and scaling: the card's statistics, or learnt in warm-up."""

    def __init__(self, mode: str, model_mean: F32, model_std: F32, *, window: int,
                 transforms: Sequence[str] | None = None, halflife: int = 0) -> None:
        c = len(model_mean)
        self.mode = mode
        self.window = window
        self.halflife = halflife
        self.requested = list(transforms) if transforms is not None else ["auto"] * c
        if len(self.requested) != c or any(t not in TRANSFORMS for t in self.requested):
            raise ValueError(f"transforms {self.requested} do not fit {c} channels")
        self.frozen = mode != "warmup"
        self.center: F64 = model_mean.astype(np.float64)
        self.spread: F64 = np.maximum(model_std.astype(np.float64), 1e-12)
        # With the card's statistics, "auto" means "as the card was trained": level.
        self.transforms = [t if t != "auto" else "level" for t in self.requested]
        self._samples: list[F32] = []
        self._kept = 0
        self._stride = 1
        self._seen = 0
        self.version = 0
        self._refresh()

    def _refresh(self) -> None:
        self.version += 1  # what offsets() worked out before may no longer hold
        self._diff = np.array([t == "diff" for t in self.transforms], dtype=bool)
        self._diff_idx = np.flatnonzero(self._diff)  # an index takes less than a mask
        self._level = ~self._diff
        d = self._diff_idx
        # Diff channels side by side: de-levelled through a view, no scatter back.
        self._diff_slice = (slice(int(d[0]), int(d[-1]) + 1)
                            if d.size and d[-1] - d[0] + 1 == d.size else None)
        self._inv = (1.0 / self.spread).astype(np.float32)
        # The same per channel, repeated for every row of a window: a flattened window
        # is scaled with one contiguous operation instead of a broadcast over its columns.
        self._inv_rows = np.tile(self._inv, self.window)
        self._center_rows = np.empty((self.window, len(self.center)), dtype=np.float32)
        self._center_flat = self._center_rows.reshape(-1)
        self._center32 = self._center_rows[0]
        self._set_center32()

    def _set_center32(self) -> None:
        """The float32 centre (``center.astype(float32)``) in every row of ``_center_rows``."""
        np.copyto(self._center_rows, self.center, casting="unsafe")

    def use_card(self, mean: F32, std: F32) -> None:
        """``normalise: model``: take a (newly swapped-in) model card's statistics."""
        if self.mode == "model":
            self.center = mean.astype(np.float64)
            self.spread = np.maximum(std.astype(np.float64), 1e-12)
            self._refresh()

    def learn(self, block: F32) -> None:
        """Warm-up: keep a (n, channels) block of new raw samples for the fit."""
        if self.frozen or block.shape[0] == 0:
            return
        if self._seen % self._stride == 0:
            self._samples.append(np.array(block, dtype=np.float32))
            self._kept += block.shape[0]
            if self._kept > WARMUP_SAMPLES_MAX:
                # Keep every other block from here on: a long warm-up stays bounded.
                self._samples = self._samples[::2]
                self._kept = sum(b.shape[0] for b in self._samples)
                self._stride *= 2
        self._seen += 1

    def freeze(self) -> None:
        """Warm-up is over: decide the transforms and fit centre and spread robustly."""
        if self.frozen:
            return
        self.frozen = True
        x = (np.concatenate(self._samples).astype(np.float64) if self._samples
             else np.zeros((0, len(self.center))))
        self._samples = []
        if x.shape[0] < max(2, self.window):
            log.warning("warm-up of %d samples too short to learn the scaling; using the "
                        "model card's", x.shape[0])
            self.transforms = [t if t != "auto" else "level" for t in self.requested]
            self._refresh()
            return
        share = np.zeros(x.shape[1])
        if "auto" in self.requested and x.shape[0] >= 4 * self.window:
            share = slowness(x, self.window)
        self.transforms = [("diff" if share[j] >= SLOW_SHARE else "level") if t == "auto"
                           else t for j, t in enumerate(self.requested)]
        diff = np.array([t == "diff" for t in self.transforms], dtype=bool)
        w = np.lib.stride_tricks.sliding_window_view(x, self.window, axis=0).transpose(0, 2, 1)
        w = w.copy()
        w[:, :, diff] -= w[:, :, diff].mean(axis=1, keepdims=True)
        v = w.reshape(-1, x.shape[1])
        med = np.median(v, axis=0)
        mad = _MAD_SIGMA * np.median(np.abs(v - med), axis=0)
        lo, hi = np.quantile(v, [TRIM, 1.0 - TRIM], axis=0)
        trimmed = np.clip(v, lo, hi).std(axis=0)
        floor = REL_FLOOR * (1.0 + np.abs(np.median(x, axis=0)))
        self.center = med
        self.spread = np.maximum(np.maximum(mad, trimmed), floor)
        log.debug("scaling: transforms %s (slowness %s)", self.transforms, np.round(share, 2))
        self._refresh()

    @property
    def tracks(self) -> bool:
        """Whether ``track`` moves the centre now."""
        return self.frozen and self.mode == "warmup" and self.halflife > 0

    def track(self, block: F32) -> None:
        """After warm-up: level channels' centre follows a block of new samples."""
        if self.tracks and block.shape[0]:
            self.track_columns(columns(block))

    def track_columns(self, cols: F64) -> None:
        """``track(block)`` given ``columns(block)`` (or a view of the same values with
        contiguous rows: each row's sum is the same)."""
        nb = cols.shape[1]
        if not self.tracks or nb == 0:
            return
        d = np.add.reduce(cols, axis=1)
        d /= nb
        d -= self.center
        d *= halflife_weight(nb, self.halflife)
        np.add(self.center, d, out=self.center, where=self._level)  # level channels only
        self._set_center32()  # only the centre moved

    @property
    def delevels(self) -> bool:
        """Whether any channel is de-levelled (``diff``): only then are there offsets."""
        return bool(self._diff_idx.size)

    def _window_means(self, windows: F32) -> F32:
        """(n, 1, diff channels) float32: each diff channel's mean over each window."""
        sub = windows[:, :, self._diff_idx]  # one gather (its mean is that of a contiguous copy)
        # sub.mean(axis=1) without its Python wrapper: the same sum and division. mean()
        # divides in float64 and rounds to float32; dividing in float32 gives the same
        # bits (a quotient of two float32 rounded through float64 is rounded once:
        # 53 >= 2 x 24 + 2, Figueroa 1995) without casting the block to float64 and back.
        m: F32 = np.add.reduce(sub, axis=1, keepdims=True)
        np.true_divide(m, np.float32(sub.shape[1]), out=m)
        return m

    def offsets(self, windows: F32, out: F32) -> None:
        """What ``apply`` de-levels (n, window, channels) raw windows by, into ``out``: each
        diff channel's window mean in every row, 0 in level channels.

        Per window and stateless (the transforms only), so it can be worked out for many
        windows at once, ahead of their batches; ``apply(w, offsets=out)`` then subtracts
        it with one contiguous operation, with the same result as ``apply(w)``:
        ``x - 0.0`` is ``x`` for every float32, and the diff channels get the same
        ``x - mean``.
        """
        out.fill(0.0)
        if self._diff_idx.size:
            out[:, :, self._diff_idx] = self._window_means(windows)

    def apply(self, windows: F32, offsets: F32 | None = None) -> None:
        """Transform and scale (n, window, channels) raw windows in place.

        ``offsets``: what ``offsets`` gave for these very windows under the same
        transforms (the result is the same, in fewer operations on contiguous windows).
        """
        if (offsets is not None and windows.flags.c_contiguous and offsets.flags.c_contiguous
                and windows.shape == offsets.shape and windows.shape[1] == self.window):
            flat = windows.reshape(windows.shape[0], -1)  # views: the same elements
            flat -= offsets.reshape(flat.shape)
            flat -= self._center_flat
            flat *= self._inv_rows
            return
        d = self._diff_idx
        if d.size:
            m = self._window_means(windows)
            if self._diff_slice is not None:
                windows[:, :, self._diff_slice] -= m
            else:
                sub = windows[:, :, d]
                sub -= m
                windows[:, :, d] = sub  # one scatter
        if windows.flags.c_contiguous and windows.shape[1] == self.window:
            flat = windows.reshape(windows.shape[0], -1)  # a view: the same elements
            flat -= self._center_flat
            flat *= self._inv_rows
        else:
            windows -= self._center32
            windows *= self._inv

    def to_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "frozen": self.frozen, "center": self.center.copy(),
                "spread": self.spread.copy(), "transforms": list(self.transforms),
                "samples": (np.concatenate(self._samples) if self._samples
                            else np.zeros((0, len(self.center)), np.float32)),
                "stride": self._stride, "seen": self._seen}

    def load_state(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise StateError(f"scaling mode {state['mode']!r} != {self.mode!r}")
        center = np.asarray(state["center"], np.float64)
        if center.shape != self.center.shape:
            raise StateError(f"scaling has {center.shape} channels, stream {self.center.shape}")
        self.frozen = bool(state["frozen"])
        self.center = center
        self.spread = np.asarray(state["spread"], np.float64)
        self.transforms = [str(t) for t in state["transforms"]]
        samples = np.asarray(state["samples"], np.float32)
        self._samples = [samples] if samples.size else []
        self._kept = samples.shape[0]
        self._stride, self._seen = int(state["stride"]), int(state["seen"])
        self._refresh()


# Warm-up windows kept for scoring once the scaling is learnt; beyond this
# many, every k-th window is kept (the threshold is a robust maximum or a
# quantile: a uniform subsample estimates it nearly as well).
WARMUP_STASH_MAX = 4096


class WarmupStash:
    """Windows seen while the scaling was still being learnt, to score once it is.

    With it, warm-up learns the scaling from *all* warm-up samples and still
    calibrates the threshold on all warm-up windows, instead of splitting the
    warm-up in two halves.
    """

    def __init__(self, expected_windows: int, window: int, channels: int) -> None:
        cap = max(1, min(expected_windows, WARMUP_STASH_MAX))
        self.stride = -(-max(expected_windows, 1) // cap)
        self.windows = np.zeros((cap, window, channels), dtype=np.float32)
        self.end_ts = np.zeros(cap, dtype=np.float64)
        self.end_index = np.zeros(cap, dtype=np.int64)
        self.n = 0
        self._seen = 0

    def __len__(self) -> int:
        return self.n

    def add(self, windows: F32, end_ts: F64, end_index: npt.NDArray[np.int64]) -> None:
        for k in range(windows.shape[0]):
            if self._seen % self.stride == 0 and self.n < self.windows.shape[0]:
                self.windows[self.n] = windows[k]
                self.end_ts[self.n] = end_ts[k]
                self.end_index[self.n] = end_index[k]
                self.n += 1
            self._seen += 1
