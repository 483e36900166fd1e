"""Online adaptation between the model and the alert rule, one ``StreamAdapter`` per stream.

What each part does, and why:

- ``RunningScaler``: the warm-up z-scoring of ``features.Normaliser`` that then
  keeps following slow drift of this device's inputs, learning only from
  windows that did not score above the threshold (an anomaly must not teach
  the scaler that it is normal).
- ``ScoreCalibrator``: tracks the level and spread of log raw scores on normal
  windows. The alert threshold (warm-up quantile x margin) moves with that
  level, and the raw score becomes a stable anomaly score in [0, 1]: a logistic
  of the distance to the threshold in units of normal spread (0.5 = at the
  threshold), the same meaning for every model and device.
- ``DriftMonitor``: river ADWIN or Page-Hinkley on the log score and on each
  channel's window mean. Drift is reported as an event, never as an alert.
- ``FeedbackHead``: labels from the cloud turn recent windows into prototypes;
  windows similar to a confirmed false alarm get lower scores, windows similar
  to a confirmed anomaly higher ones.
- ``HalfSpaceDetector``: for ``model: none`` streams, river's HalfSpaceTrees
  over per-window features scores windows instead of a model.

Every component has river-shaped ``learn_one(x)`` / ``score_one(x)`` methods on
dicts (what the contract test drives; unknown keys are ignored, missing ones
tolerated), batch methods on numpy arrays (what the pipeline calls per batch of
windows, never per reading), a ``seed``, and pickles. river is imported only by
the components that use it, when they first do (importing river.drift or
river.anomaly costs ~80 MB RSS and about a second).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import StreamConfig
from agent.features import Normaliser
from agent.model import ModelCard

__all__ = [
    "Detector",
    "DriftEvent",
    "DriftMonitor",
    "FeedbackHead",
    "GaussianDetector",
    "HalfSpaceDetector",
    "RunningScaler",
    "ScoreCalibrator",
    "StreamAdapter",
    "build_adapter",
    "fingerprint",
    "river_card",
    "window_summaries",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# Raw scores of 0 (a flat line reconstructed perfectly) must still have a log.
LOG_EPS = 1e-9
# Spread of log scores never assumed below this: with a constant warm-up score
# the calibrated score would otherwise jump from 0 to 1 on any change.
LOG_SIGMA_FLOOR = 0.05
# Warm-up log scores kept for the calibrator's robust level (reservoir-sampled).
WARM_RESERVOIR = 2048
# Feedback labels must name a window this recent (windows remembered).
FEEDBACK_HISTORY = 512


def _halflife_weight(n: float, halflife: float) -> float:
    """Weight of ``n`` new samples in an exponential average with this half-life."""
    return float(1.0 - 0.5 ** (n / halflife))


class RunningScaler(Normaliser):
    """Per-channel z-scoring learnt in warm-up, then following slow drift of normal input."""

    def __init__(
        self,
        mode: str,
        model_mean: F32,
        model_std: F32,
        learn_samples: int,
        fields: Sequence[str],
        *,
        halflife: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(mode, model_mean, model_std, learn_samples)
        self.fields = tuple(fields)
        self.halflife = halflife
        self.seed = seed  # nothing random; kept for the common component contract
        self.var = self.std.astype(np.float64) ** 2

    def _freeze(self) -> None:
        super()._freeze()
        self.var = self.std**2

    def track(self, block: F32) -> None:
        """Fold a (n, channels) block of new normal samples into the drifting statistics."""
        if not self.frozen:
            self.learn(block)
            return
        nb = block.shape[0]
        if self.halflife <= 0 or nb == 0:
            return
        b = block.astype(np.float64)
        bm = b.mean(axis=0)
        bv = b.var(axis=0)
        w = _halflife_weight(nb, self.halflife)
        d = bm - self.mean
        # Variance of the mixture of the old distribution and the block, weighted.
        self.var = (1 - w) * self.var + w * bv + w * (1 - w) * d**2
        self.mean = self.mean + w * d
        self.std = np.maximum(np.sqrt(self.var), self._floor)
        self._inv = (1.0 / self.std).astype(np.float32)
        self._mean32 = self.mean.astype(np.float32)

    def _vector(self, x: Mapping[str, Any]) -> F32:
        # A missing channel carries no information: stand in the current mean.
        return np.array([float(x[f]) if f in x else self.mean[i]
                         for i, f in enumerate(self.fields)], dtype=np.float32)

    def learn_one(self, x: Mapping[str, Any]) -> None:
        self.track(self._vector(x)[None, :])

    def transform_one(self, x: Mapping[str, Any]) -> dict[str, float]:
        return {f: float((x[f] - self.mean[i]) / self.std[i])
                for i, f in enumerate(self.fields) if f in x}

    def score_one(self, x: Mapping[str, Any]) -> float:
        """How unusual one reading is: RMS of its z-scores (0 when no known field)."""
        z = list(self.transform_one(x).values())
        return float(np.sqrt(np.mean(np.square(z)))) if z else 0.0


class ScoreCalibrator:
    """Level/spread of log raw scores on normal windows; moves the threshold, maps to [0, 1].

    Warm-up: median and MAD of (a seeded reservoir of) the warm-up log scores,
    robust to the zeros a detector gives before it has seen enough. After
    warm-up: an exponential average with ``halflife`` windows over windows below
    the threshold only, each log score clipped to 3 spreads from the level so
    one odd window cannot move it far. ``halflife=0`` keeps the warm-up level.
    """

    def __init__(self, halflife: int = 2000, seed: int = 0) -> None:
        self.halflife = halflife
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._warm: list[float] = []
        self._n_warm = 0
        self.n = 0
        self.mu = 0.0
        self.var = 0.0
        self.mu0: float | None = None  # level when the base threshold was set
        self.base_threshold: float | None = None

    @property
    def sigma(self) -> float:
        return max(math.sqrt(self.var), LOG_SIGMA_FLOOR)

    def learn_warm(self, raw: F32) -> None:
        """Keep warm-up scores (reservoir-sampled) and refresh the robust level and spread."""
        for v in np.log(raw.astype(np.float64) + LOG_EPS):
            self._n_warm += 1
            if len(self._warm) < WARM_RESERVOIR:
                self._warm.append(float(v))
            else:
                j = int(self._rng.integers(0, self._n_warm))
                if j < WARM_RESERVOIR:
                    self._warm[j] = float(v)
        w = np.asarray(self._warm)
        self.mu = float(np.median(w))
        self.var = float((1.4826 * np.median(np.abs(w - self.mu))) ** 2)
        self.n = len(self._warm)

    def start(self, base_threshold: float) -> None:
        """Warm-up is over: remember the threshold it produced and the score level then."""
        self.base_threshold = base_threshold
        self.mu0 = self.mu
        self._warm = []

    def learn_normal(self, raw: F32) -> None:
        """Fold scores of windows that stayed below the threshold."""
        if self.halflife <= 0 or raw.size == 0:
            return
        if self.n < 2:
            self.learn_warm(raw)
            return
        a = _halflife_weight(1, self.halflife)
        for v in np.log(raw.astype(np.float64) + LOG_EPS):
            sd = self.sigma
            d = min(max(v - self.mu, -3 * sd), 3 * sd)
            self.mu += a * d
            self.var = (1 - a) * (self.var + a * d * d)
            self.n += 1

    def threshold(self) -> float | None:
        """The base threshold moved by how far the normal score level has moved since."""
        if self.base_threshold is None or self.mu0 is None:
            return None
        if not math.isfinite(self.base_threshold) or self.base_threshold <= 0:
            return self.base_threshold
        return self.base_threshold * math.exp(self.mu - self.mu0)

    def calibrate(self, raw: F32, threshold: float | None) -> F32:
        """Anomaly scores in [0, 1]; 0.5 exactly at ``threshold``, 0 before there is one."""
        if threshold is None or not math.isfinite(threshold):
            return np.zeros(raw.shape, dtype=np.float32)
        z = (np.log(raw.astype(np.float64) + LOG_EPS) - math.log(threshold + LOG_EPS)) / self.sigma
        out: F32 = (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)
        return out

    def learn_one(self, x: Mapping[str, Any]) -> None:
        if "score" not in x:
            return
        raw = np.array([float(x["score"])], dtype=np.float32)
        if self.base_threshold is None:
            self.learn_warm(raw)
        else:
            self.learn_normal(raw)

    def score_one(self, x: Mapping[str, Any]) -> float:
        if "score" not in x:
            return 0.0
        thr = self.threshold()
        if thr is None:  # contract use before warm-up ended: relative to the level itself
            thr = math.exp(self.mu)
        return float(self.calibrate(np.array([float(x["score"])], np.float32), thr)[0])


@dataclass(frozen=True)
class DriftEvent:
    kind: str  # "score" or "input"
    field: str | None  # the channel, for input drift
    estimate: float  # the detector's estimate of the new mean after the change


class DriftMonitor:
    """river drift detectors on the log score and on each channel's window mean."""

    def __init__(self, fields: Sequence[str], kind: str = "adwin", delta: float = 0.002,
                 seed: int = 0) -> None:
        self.fields = tuple(fields)
        self.kind = kind
        self.delta = delta
        self.seed = seed  # ADWIN and Page-Hinkley are deterministic
        self._detectors: dict[str, Any] | None = None
        self.detections = 0
        self.last: list[DriftEvent] = []

    def _make(self) -> Any:
        # Lazily: river.drift pulls in scipy.stats (~80 MB RSS).
        from river import drift  # noqa: PLC0415

        if self.kind == "page_hinkley":
            return drift.PageHinkley(delta=self.delta)
        return drift.ADWIN(delta=self.delta)  # type: ignore[no-untyped-call]

    def _get(self) -> dict[str, Any]:
        if self._detectors is None:
            self._detectors = {k: self._make() for k in ("score", *self.fields)}
        return self._detectors

    def update(self, log_scores: F64, channel_means: F64) -> list[DriftEvent]:
        """One entry per window: its log score and (channels,) mean; return drifts seen."""
        det = self._get()
        events: list[DriftEvent] = []
        for i in range(log_scores.shape[0]):
            d = det["score"]
            d.update(float(log_scores[i]))
            if d.drift_detected:
                events.append(DriftEvent("score", None, float(getattr(d, "estimation", 0.0))))
            for j, f in enumerate(self.fields):
                d = det[f]
                d.update(float(channel_means[i, j]))
                if d.drift_detected:
                    events.append(DriftEvent("input", f, float(getattr(d, "estimation", 0.0))))
        self.detections += len(events)
        self.last = events
        return events

    def learn_one(self, x: Mapping[str, Any]) -> None:
        score = float(x.get("score", 0.0))
        means = np.array([[float(x.get(f, 0.0)) for f in self.fields]], dtype=np.float64)
        self.update(np.array([math.log(max(score, 0.0) + LOG_EPS)]), means)

    def score_one(self, x: Mapping[str, Any]) -> float:
        """Drifts reported by the last ``learn_one`` (the detectors only see data there)."""
        return float(len(self.last))


def window_summaries(windows: F32) -> F64:
    """(n, window, channels) normalised windows -> (n, 2 x channels) mean and spread."""
    mean = windows.mean(axis=1, dtype=np.float64)
    std = windows.std(axis=1, dtype=np.float64)
    out: F64 = np.concatenate([mean, std], axis=1)
    return out


class FeedbackHead:
    """Operator labels on recent windows, used to push similar windows' scores down or up."""

    def __init__(self, radius: float = 1.5, weight: float = 1.0, max_labels: int = 64,
                 seed: int = 0) -> None:
        self.radius = radius
        self.weight = weight
        self.max_labels = max_labels
        self.seed = seed
        self._recent: deque[tuple[float, F64]] = deque(maxlen=FEEDBACK_HISTORY)
        self.prototypes: deque[tuple[F64, bool]] = deque(maxlen=max_labels)  # (summary, anomaly)
        self.labels = {"normal": 0, "anomaly": 0}

    def remember(self, end_ts: F64, summaries: F64) -> None:
        for t, s in zip(end_ts, summaries, strict=True):
            self._recent.append((float(t), s))

    def label(self, ts: float, label: str) -> bool:
        """Turn the remembered window whose end is nearest ``ts`` into a prototype."""
        if label not in self.labels:
            raise ValueError(f"label must be 'normal' or 'anomaly', got {label!r}")
        if not self._recent or not (self._recent[0][0] - 1.0 <= ts <= self._recent[-1][0] + 1.0):
            return False
        _, summary = min(self._recent, key=lambda r: abs(r[0] - ts))
        self.prototypes.append((summary.copy(), label == "anomaly"))
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

    @staticmethod
    def _summary(x: Mapping[str, Any]) -> F64:
        keys = sorted(k for k in x if k != "label" and isinstance(x[k], int | float))
        return np.array([float(x[k]) for k in keys], dtype=np.float64)

    def learn_one(self, x: Mapping[str, Any]) -> None:
        label = x.get("label")
        if label in self.labels:
            self.prototypes.append((self._summary(x), label == "anomaly"))
            self.labels[str(label)] += 1

    def score_one(self, x: Mapping[str, Any]) -> float:
        """What a raw score of 1 becomes for this window, with a normal level of 0.1."""
        return float(self.adjust(np.ones(1), self._summary(x)[None, :], 0.1)[0])


class HalfSpaceDetector:
    """river HalfSpaceTrees over per-window features, for streams without a model."""

    def __init__(self, fields: Sequence[str], n_trees: int = 10, height: int = 8,
                 window_size: int = 250, seed: int = 0) -> None:
        self.fields = tuple(fields)
        self.n_trees = n_trees
        self.height = height
        self.window_size = window_size
        self.seed = seed
        self._hst: Any = None
        self.scored_ready = False  # whether the last score() ran on a ready detector

    def _get(self) -> Any:
        if self._hst is None:
            from river import anomaly  # noqa: PLC0415  (lazily: ~80 MB RSS)

            self._hst = anomaly.HalfSpaceTrees(n_trees=self.n_trees, height=self.height,
                                               window_size=self.window_size, seed=self.seed)
        return self._hst

    def features(self, windows: F32) -> list[dict[str, float]]:
        """Features of normalised windows, squashed into HalfSpaceTrees' [0, 1] box."""
        last = windows[:, -1, :]
        mean = windows.mean(axis=1)
        std = windows.std(axis=1)
        step = windows[:, -1, :] - windows[:, -2, :] if windows.shape[1] > 1 else last * 0
        parts = {"last": last, "mean": mean, "std": std, "step": step}
        squashed = {k: 0.5 + 0.5 * np.tanh(v / 4.0) for k, v in parts.items()}
        return [{f"{f}.{k}": float(v[i, j]) for k, v in squashed.items()
                 for j, f in enumerate(self.fields)} for i in range(windows.shape[0])]

    @property
    def ready(self) -> bool:
        """False until the trees have a reference window; scores are 0 until then."""
        return self._hst is not None and not self._hst._first_window

    def score(self, windows: F32) -> F32:
        hst = self._get()
        self.scored_ready = self.ready
        return np.array([hst.score_one(x) for x in self.features(windows)], dtype=np.float32)

    def learn(self, windows: F32) -> None:
        hst = self._get()
        for x in self.features(windows):
            hst.learn_one(x)

    def learn_one(self, x: Mapping[str, Any]) -> None:
        self._get().learn_one(dict(x))

    def score_one(self, x: Mapping[str, Any]) -> float:
        return float(self._get().score_one(dict(x)))


class GaussianDetector:
    """Windowed-Gaussian scoring for streams without a model, in numpy (no river).

    A window's score is how many long-run standard deviations the mean of its
    last ``short`` samples sits from the long-run mean, the largest over the
    channels. The long run is an exponentially weighted mean and variance with
    ``halflife`` samples (2200 weighs the past like NAB's 6400-sample sliding
    window: the same mean age). Every sample updates it, anomalous or not, so a
    level shift becomes the new normal instead of alarming for ever (NAB's own
    windowed-Gaussian detector does the same).
    """

    READY_AFTER = 50  # samples before the spread means anything

    def __init__(self, fields: Sequence[str], hop: int = 1, halflife: int = 2200,
                 short: int = 10, seed: int = 0) -> None:
        self.fields = tuple(fields)
        self.hop = hop
        self.halflife = halflife
        self.short = short
        self.seed = seed  # nothing random; kept for the common component contract
        self._a = _halflife_weight(1, halflife)
        c = len(self.fields)
        self.mean = np.zeros(c)
        self.var = np.zeros(c)
        self.n = 0
        self._recent: list[list[float]] = []  # last `short` samples, for score_one
        self.scored_ready = False

    @property
    def ready(self) -> bool:
        return self.n >= self.READY_AFTER

    def _fold(self, x: npt.NDArray[np.float64]) -> None:
        # Plain running mean/variance until there are about 1/a samples, then
        # exponential: early samples are not over-weighted by the start value.
        a = max(self._a, 1.0 / (self.n + 1))
        d = x - self.mean
        self.mean = self.mean + a * d
        self.var = (1 - a) * (self.var + a * d * d)
        self.n += 1

    def _z(self, short_mean: npt.NDArray[np.float64]) -> float:
        if not self.ready:
            return 0.0
        sd = np.sqrt(np.maximum(self.var, 1e-12))
        return float(np.max(np.abs(short_mean - self.mean) / sd))

    def score(self, windows: F32) -> F32:
        """Score (n, window, channels) windows in order, folding each one's new samples in."""
        self.scored_ready = self.ready
        s = min(self.short, windows.shape[1])
        out = np.empty(windows.shape[0], dtype=np.float32)
        for k in range(windows.shape[0]):
            w = windows[k].astype(np.float64)
            out[k] = self._z(w[-s:].mean(axis=0))
            for row in w[-min(self.hop, w.shape[0]):]:
                self._fold(row)
        return out

    def learn(self, windows: F32) -> None:
        """Nothing to do: score() already learnt from every window, normal or not."""

    def _vector(self, x: Mapping[str, Any]) -> npt.NDArray[np.float64]:
        return np.array([float(x[f]) if f in x else self.mean[i]
                         for i, f in enumerate(self.fields)], dtype=np.float64)

    def learn_one(self, x: Mapping[str, Any]) -> None:
        v = self._vector(x)
        self._recent = ([*self._recent, v.tolist()])[-self.short:]
        self._fold(v)

    def score_one(self, x: Mapping[str, Any]) -> float:
        recent = np.array([*self._recent[-(self.short - 1):], self._vector(x).tolist()]) \
            if self.short > 1 else self._vector(x)[None, :]
        return self._z(recent.mean(axis=0))


Detector = HalfSpaceDetector | GaussianDetector


@dataclass
class AdaptResult:
    """What one batch of windows came out as."""

    raw: F32  # model score x feedback factor: what the alert rule compares
    anomaly: F32  # calibrated, in [0, 1]
    drift: list[DriftEvent]


class StreamAdapter:
    """Everything adaptive one stream owns; pickled as one checkpoint."""

    def __init__(
        self,
        fields: Sequence[str],
        *,
        calibrator: ScoreCalibrator,
        feedback: FeedbackHead | None,
        drift: DriftMonitor | None,
        detector: Detector | None,
        adaptive_threshold: bool,
    ) -> None:
        self.fields = tuple(fields)
        self.calibrator = calibrator
        self.feedback = feedback
        self.drift = drift
        self.detector = detector
        self.adaptive_threshold = adaptive_threshold
        self.index_offset = 0  # samples seen before a restore: warm-up is not repeated
        self.seen = 0  # sample number (across restores) of the newest window read
        self.windows_learnt = 0
        self.drift_events = 0
        self.last_end_index: npt.NDArray[np.int64] = np.zeros(0, np.int64)
        self.last_anomaly: F32 = np.zeros(0, np.float32)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["last_end_index"] = np.zeros(0, np.int64)
        state["last_anomaly"] = np.zeros(0, np.float32)
        return state

    def status(self) -> dict[str, Any]:
        """Per-stream figures for the status message."""
        fb = self.feedback
        return {
            "score_level": round(math.exp(self.calibrator.mu), 6) if self.calibrator.n else None,
            "drift_events": self.drift_events,
            "labels": dict(fb.labels) if fb is not None else {},
        }

    def adjust(self, raw: F32, summaries: F64) -> F32:
        """Apply operator feedback to raw scores."""
        if self.feedback is None or not self.feedback.prototypes:
            return raw
        level = math.exp(self.calibrator.mu) if self.calibrator.n else 0.0
        out: F32 = self.feedback.adjust(raw, summaries, level).astype(np.float32)
        return out

    def after_rule(
        self,
        raw: F32,
        warm: npt.NDArray[np.bool_],
        rule_threshold: float | None,
        *,
        windows: F32,
        summaries: F64,
        end_ts: F64,
    ) -> tuple[F32, npt.NDArray[np.bool_], list[DriftEvent]]:
        """Learn from a scored batch; return anomaly scores, the normal mask, drift events."""
        cal = self.calibrator
        # A detector that has not filled its reference window scores 0: not a level to learn.
        scored = self.detector is None or self.detector.scored_ready
        if warm.any() and scored:
            cal.learn_warm(raw[warm])
        if cal.base_threshold is None and rule_threshold is not None and not warm.all():
            cal.start(rule_threshold)
        thr = rule_threshold
        anomaly = cal.calibrate(raw, thr)
        normal = warm | (raw <= (thr if thr is not None else math.inf))
        post = normal & ~warm
        if post.any():
            cal.learn_normal(raw[post])
        if self.detector is not None and normal.any():
            self.detector.learn(windows[normal])
        self.windows_learnt += int(normal.sum())
        if self.feedback is not None:
            self.feedback.remember(end_ts, summaries)
        events: list[DriftEvent] = []
        if self.drift is not None:
            n = windows.shape[2]
            events = self.drift.update(np.log(raw.astype(np.float64) + LOG_EPS),
                                       summaries[:, :n])
            self.drift_events += len(events)
        return anomaly, normal, events

    def next_threshold(self, rule_threshold: float | None) -> float | None:
        """The threshold the rule should use for the next batch."""
        if not self.adaptive_threshold or rule_threshold is None:
            return rule_threshold
        return self.calibrator.threshold()


def river_card(s: StreamConfig) -> ModelCard:
    """The card a ``model: none`` stream reports: no file, identity preprocessing."""
    c = len(s.fields)
    # A tiny model spread keeps the scaler's floor (a fraction of it) out of the way:
    # river streams carry any units, and their scaling is always learnt in warm-up.
    hst = s.adapt.detector == "hst"
    return ModelCard(name="river-hst" if hst else "windowed-gaussian", version=0,
                     format="river" if hst else "numpy", path=Path(), sha256="",
                     size=0, window=s.window, fields=tuple(s.fields),
                     mean=np.zeros(c, np.float32), std=np.full(c, 1e-6, np.float32),
                     score_kind="halfspacetrees" if hst else "gaussian_z", raw={})


def build_adapter(s: StreamConfig, card: ModelCard, scorer: object
                  ) -> tuple[RunningScaler, StreamAdapter]:
    """A stream's scaler and adaptation layer, fresh (before any checkpoint is restored)."""
    a = s.adapt
    # A model stream learns its scaling from the whole warm-up (its windows are
    # scored afterwards, see WarmupStash); a model: none stream needs the second
    # half to fill its detector's reference window.
    learn = s.warmup if s.model != "none" else s.warmup // 2
    scaler = RunningScaler(s.normalise, card.mean, card.std, learn, s.fields,
                           halflife=a.input_halflife, seed=a.seed)
    adapter = StreamAdapter(
        s.fields,
        calibrator=ScoreCalibrator(a.threshold_halflife, seed=a.seed),
        feedback=(FeedbackHead(a.feedback_radius, a.feedback_weight, a.feedback_max_labels,
                               seed=a.seed) if a.feedback else None),
        drift=(DriftMonitor(s.fields, a.drift, a.drift_delta, seed=a.seed)
               if a.drift != "none" else None),
        detector=scorer if isinstance(scorer, HalfSpaceDetector | GaussianDetector) else None,
        adaptive_threshold=s.alert.threshold == "auto" and a.threshold_halflife > 0,
    )
    return scaler, adapter


def fingerprint(s: StreamConfig, card: ModelCard) -> dict[str, Any]:
    """What a checkpoint must match to be restored: a change here starts the stream fresh."""
    return {
        "fields": list(s.fields), "window": s.window, "hop": s.hop, "warmup": s.warmup,
        "normalise": s.normalise, "model": card.name, "model_version": card.version,
        "model_sha256": card.sha256,
        "alert": {"threshold": s.alert.threshold, "quantile": s.alert.quantile,
                  "margin": s.alert.margin},
        "adapt": dataclasses.asdict(s.adapt),
    }
