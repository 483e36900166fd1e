"""One stream's pipeline: ring buffer -> features -> scorer -> calibrator -> episodes -> events.

No MQTT, no SQLite, no threads of its own: the daemon pushes decoded samples
in and sends the events it gets back to the outbox; replay, the evaluation and
the benchmarks drive it the same way with a list as the sink.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import StreamConfig, postprocess_on
from agent.pipeline.aggregate import SummaryAggregator
from agent.pipeline.buffer import RingBuffer
from agent.pipeline.calibrate import Calibrator
from agent.pipeline.drift import DriftMonitor
from agent.pipeline.episode import EpisodeClosed, EpisodeOpened, EpisodeRule
from agent.pipeline.events import Drift, Episode, Event, ScoreBatch, Summary
from agent.pipeline.features import Scaling, WarmupStash, columns
from agent.pipeline.feedback import FeedbackHead, window_summaries
from agent.pipeline.postprocess import PostProcessor
from agent.scoring.base import F32, F64, Scorer, StateError, TransformAware
from agent.scoring.card import ModelCard
from agent.scoring.slot import ModelSlot, ShadowBatch

__all__ = ["SCORE_MAX", "StreamPipeline", "fingerprint"]

log = logging.getLogger(__name__)

# Largest score a window can have (non-finite ones are set to it); far below
# float32's limit so later arithmetic (feedback doubles a score) stays finite.
SCORE_MAX = 1e30
# What one ring read copies out at most, in windows and in bytes, rounded down to whole
# batches (at least one): a frame of 256 samples at hop 4 is 64 windows, read and
# summarised together; long windows stay at one batch per read, as they were.
READ_WINDOWS = 256
READ_BYTES = 256 * 1024
I64 = npt.NDArray[np.int64]


def fingerprint(s: StreamConfig, card: ModelCard) -> dict[str, Any]:
    """What a checkpoint must match to be restored: a change here starts the stream fresh."""
    import dataclasses  # noqa: PLC0415

    return {
        "fields": list(s.fields), "window": s.window, "hop": s.hop, "warmup": s.warmup,
        "normalise": s.normalise, "model": card.name, "model_version": card.version,
        "model_sha256": card.sha256, "format": card.format,
        "alert": {"threshold": s.alert.threshold, "quantile": s.alert.quantile,
                  "margin": s.alert.margin, "smoothing": s.alert.smoothing},
        "adapt": dataclasses.asdict(s.adapt),
        "postprocess": dataclasses.asdict(s.postprocess),
    }


def stream_transforms(cfg: StreamConfig, card: ModelCard) -> list[str]:
    """Per field: the config's transform, else what the model was trained with (a model-free
    detector: decided from the warm-up)."""
    if card.size > 0:
        base = list(card.transforms) if card.transforms is not None else ["level"] * len(
            cfg.fields)
    else:
        base = ["auto"] * len(cfg.fields)
    return [cfg.transforms.get(f, t) for f, t in zip(cfg.fields, base, strict=True)]


class StreamPipeline:
    """Everything one stream does between a decoded sample and an upstream event."""

    def __init__(self, cfg: StreamConfig, card: ModelCard, scorer: Scorer, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._clock = clock
        c, a = len(cfg.fields), cfg.adapt
        # One lock per stream: ingest, the inference thread and fleet swaps take turns.
        self.lock = threading.RLock()
        self.slot = ModelSlot(cfg.name, window=cfg.window, fields=tuple(cfg.fields),
                              batch=cfg.batch, normalise=cfg.normalise, card=card,
                              scorer=scorer, lock=self.lock)
        self.slot.on_swap = self._swapped
        self.ring = RingBuffer(cfg.buffer, c, cfg.window, cfg.hop)
        self.scaling = Scaling(cfg.normalise, card.mean, card.std, window=cfg.window,
                               transforms=stream_transforms(cfg, card),
                               halflife=a.input_halflife)
        pp = cfg.postprocess
        self.post: PostProcessor | None = None
        fixed = None if cfg.alert.threshold == "auto" else float(cfg.alert.threshold)
        if postprocess_on(cfg):
            # Its output is a probability-like score in [0, 1]: an auto threshold is the
            # configured level on it, not something to learn from the warm-up.
            fixed = pp.threshold if fixed is None else fixed
            self.post = PostProcessor(
                likelihood=pp.likelihood, rest_windows=pp.rest_windows,
                # The range rule learns raw values; a scaled scorer's warm-up windows reach
                # it scaled, so it serves single-channel detectors that read raw values.
                range_rule=pp.range_rule and c == 1 and not scorer.scaled, trigger=fixed,
                range_frac=pp.range_frac,
                warmup_windows=max(0, (cfg.warmup - cfg.window) // cfg.hop + 1))
        self.calibrator = Calibrator(
            threshold=fixed, quantile=cfg.alert.quantile, margin=cfg.alert.margin,
            smoothing=cfg.alert.smoothing, halflife=a.threshold_halflife, seed=a.seed,
            bounded=self.post is not None)
        al = cfg.alert
        self.episodes = EpisodeRule(al.consecutive, al.clear_windows, al.clear_ratio,
                                    al.cooldown_s, al.onset_windows)
        self.feedback = (FeedbackHead(a.feedback_radius, a.feedback_weight,
                                      a.feedback_max_labels) if a.feedback else None)
        self.drift = DriftMonitor(cfg.fields, a.drift, a.drift_delta) if a.drift != "none" \
            else None
        self.summary = SummaryAggregator(cfg.fields, cfg.summary_s)
        # A scorer that reads scaled windows waits for the scaling the whole warm-up
        # teaches; its warm-up windows are kept and scored once it is learnt.
        self.stash: WarmupStash | None = None
        if scorer.scaled and not self.scaling.frozen:
            self.stash = WarmupStash(cfg.warmup // cfg.hop + 1, cfg.window, c)
        # One ring read takes up to this many windows (whole batches); they are scored in
        # batches of cfg.batch all the same, so results do not depend on it.
        per_read = min(READ_WINDOWS, READ_BYTES // (4 * cfg.window * c))
        span = cfg.batch * max(1, per_read // cfg.batch)
        self._windows = np.zeros((span, cfg.window, c), dtype=np.float32)
        self._end_ts = np.zeros(span, dtype=np.float64)
        self._end_index = np.zeros(span, dtype=np.int64)
        # De-levelling offsets (Scaling.offsets) of the last read's windows from
        # _offsets_from to _got, worked out at the first batch that needs them, under
        # the scaling's version _offsets_version.
        self._offsets: F32 | None = None
        self._got = self._offsets_from = 0
        self._offsets_version = -1
        # The last read's new raw samples (each window's newest hop rows) as float64
        # columns (features.columns), from window _inputs_from on: what Scaling.track
        # reads, worked out before the first of those windows is scaled in place.
        self._inputs: F64 | None = None
        self._inputs_from = 0
        # The windows of the last read scored so far (from, to): the feedback head keeps
        # them in one go at the end of the read (a label waits for the lock meanwhile).
        self._to_remember: tuple[int, int] | None = None
        # Scored batches not yet in the summary: merged once per process() call.
        self._scored: list[tuple[F32, F64, int]] = []
        self.offset = 0  # samples seen before a restored checkpoint: warm-up is not repeated
        self.seen = 0  # sample number (across restores) of the newest window's end
        self.messages = 0
        self.samples = 0
        self.windows_scored = 0
        self.nonfinite_scores = 0
        self.last_score: float | None = None
        self.last_drift_ts = -math.inf
        self._episode_base = 0  # episodes opened before a restore

    @property
    def card(self) -> ModelCard:
        return self.slot.card

    @property
    def threshold(self) -> float | None:
        return self.calibrator.threshold

    @property
    def alerts(self) -> int:
        return self.episodes.episode - self._episode_base

    @property
    def state(self) -> str:
        """``warming_up``, ``normal`` or ``anomaly``."""
        if self.calibrator.warm:
            return "warming_up"
        return "anomaly" if self.episodes.active else "normal"

    # -- input ------------------------------------------------------------------------

    def append(self, ts: float | F64, values: Any) -> int:
        """Add one reading (scalar ``ts``) or a frame; return the windows ready to score."""
        self.messages += 1
        if isinstance(ts, np.ndarray):
            self.samples += len(ts)
            return self.ring.extend(ts, values)
        self.samples += 1
        return self.ring.append(ts, values)

    def push(self, ts: float | F64, values: Any) -> list[Event]:
        """Add readings and score every window that is ready."""
        self.append(ts, values)
        return self.process()

    def process(self) -> list[Event]:
        """Score every ready window, in batches; return what happened."""
        events: list[Event] = []
        cfg = self.cfg
        with self.lock:
            while True:
                got = self.ring.read(self._windows, self._end_ts, self._end_index,
                                     self._windows.shape[0])
                if got == 0:
                    break
                # nothing worked out for this read yet
                self._got = self._offsets_from = self._inputs_from = got
                if self.summary.enabled:
                    self.summary.add_samples(self._new_samples(got), self._clock())
                if self.offset:  # sample numbers across restores, for the whole read at once
                    self._end_index[:got] += self.offset
                try:
                    for a in range(0, got, cfg.batch):
                        self._batch(a, min(a + cfg.batch, got), events)
                finally:
                    self._remember_read()
            self._summarise_scores()
        return events

    def _remember_read(self) -> None:
        """Hand the feedback head the windows of the last read scored so far, if any."""
        if self._to_remember is not None and self.feedback is not None:
            a, b = self._to_remember
            self.feedback.remember(self._end_ts[a:b], self._windows[a:b])
        self._to_remember = None

    def _summarise_scores(self) -> None:
        """Merge the batches scored since the last call into the summary period, at once."""
        done, self._scored = self._scored, []
        if len(done) == 1:
            raw, ts, opened = done[0]
            self.summary.add_scores(raw, ts, opened, self._clock())
        elif done:
            self.summary.add_scores(np.concatenate([d[0] for d in done]),
                                    np.concatenate([d[1] for d in done]),
                                    sum(d[2] for d in done), self._clock())

    def _batch(self, a: int, b: int, events: list[Event]) -> None:
        """Score windows ``a:b`` of the last read: one batch, warm windows first."""
        w, ts, idx = self._windows[a:b], self._end_ts[a:b], self._end_index[a:b]
        self.seen = int(idx[-1])
        n = b - a
        warmup = self.cfg.warmup
        # Warm windows come first (end indices rise): past the warm-up there are none.
        k = 0 if int(idx[0]) > warmup else int(np.count_nonzero(idx <= warmup))
        if k:
            self._warm(w[:k], ts[:k], idx[:k], events, at=a)
        if k < n:
            self.end_warmup(events)
            self._score(w[k:], ts[k:], idx[k:], events, warm=False, at=a + k)

    def _new_samples(self, n: int) -> F32:
        """The samples the last read added: each window's newest ``hop`` rows."""
        hop, w = self.cfg.hop, self.cfg.window
        tail = self._windows[:n, w - hop:].reshape(-1, self._windows.shape[2])
        if self._end_index[0] == w:  # the stream's first window: all of it is new
            return np.concatenate([self._windows[0, : w - hop], tail])
        return tail

    # -- warm-up ------------------------------------------------------------------------

    def _warm(self, w: F32, ts: F64, idx: I64, events: list[Event], *, at: int) -> None:
        if self.stash is None:
            self._score(w, ts, idx, events, warm=True, at=at)
            return
        hop = self.cfg.hop
        for k in range(w.shape[0]):
            # Each window's newest `hop` rows are samples no earlier window held.
            self.scaling.learn(w[k] if idx[k] - self.offset == self.cfg.window else w[k, -hop:])
        self.stash.add(w, ts, idx)

    def end_warmup(self, events: list[Event] | None = None) -> None:
        """Learn the scaling, fit the scorer and set the threshold (idempotent)."""
        if not self.calibrator.warm:
            return
        if self.slot.scorer.scaled:
            self.scaling.freeze()
            if isinstance(self.slot.scorer, TransformAware):
                self.slot.scorer.use_transforms(self.scaling.transforms)
        stash = self.stash
        if stash is not None and len(stash):
            ws = stash.windows[: len(stash)].copy()
            self.scaling.apply(ws)
            # Raises before anything is consumed: the stash stays for the next try.
            fitted = self.slot.scorer.fit(ws)
            self.stash = None
            sink: list[Event] = [] if events is None else events
            b = self.cfg.batch
            for i in range(0, len(stash), b):
                j = min(i + b, len(stash))
                self._score(ws[i:j], stash.end_ts[i:j], stash.end_index[i:j], sink, warm=True,
                            scaled=True, raw=None if fitted is None else fitted[i:j].copy())
        self.stash = None
        self.calibrator.finish_warmup()
        self._summarise_scores()

    # -- scoring ------------------------------------------------------------------------

    def _read_offsets(self, at: int, n: int) -> F32 | None:
        """De-levelling offsets of windows ``at:at + n`` of the last read (None: nothing
        is de-levelled), worked out once for the rest of the read: per window and
        stateless, so the batches' results do not depend on it."""
        scaling = self.scaling
        if not scaling.delevels:
            return None
        if self._offsets is None:
            self._offsets = np.zeros_like(self._windows)
        if at < self._offsets_from or self._offsets_version != scaling.version:
            scaling.offsets(self._windows[at:self._got], self._offsets[at:self._got])
            self._offsets_from, self._offsets_version = at, scaling.version
        return self._offsets[at:at + n]

    def _read_inputs(self, at: int, n: int) -> F64:
        """``columns`` of the new raw samples of windows ``at:at + n`` of the last read (a
        view with contiguous rows), worked out once for the rest of the read while its
        windows are still raw."""
        if at < self._inputs_from:
            hop = self.cfg.hop
            self._inputs = columns(
                self._windows[at:self._got, -hop:].reshape(-1, self._windows.shape[2]))
            self._inputs_from = at
        assert self._inputs is not None
        hop, base = self.cfg.hop, self._inputs_from
        return self._inputs[:, (at - base) * hop:(at - base + n) * hop]

    def _score(self, w: F32, ts: F64, idx: I64, events: list[Event], *, warm: bool,
               scaled: bool = False, raw: F32 | None = None, at: int | None = None) -> None:
        """Score a batch; ``at``: its position in the last read when ``w`` is part of it."""
        cfg, slot, cal = self.cfg, self.slot, self.calibrator
        scorer = slot.scorer
        c = w.shape[2]
        n = w.shape[0]
        # The batch's new raw samples as columns, taken before scaling: the scaling follows
        # them (below).
        inputs = None
        if not warm and scorer.scaled and self.scaling.tracks:
            inputs = (self._read_inputs(at, n) if at is not None
                      else columns(w[:, -cfg.hop:].reshape(-1, c)))
        newest = w[:, -cfg.hop:, 0].astype(np.float64) if self.post is not None else None
        if scorer.scaled and not scaled:
            self.scaling.apply(w, None if at is None else self._read_offsets(at, w.shape[0]))
        if raw is None:
            t0 = time.perf_counter()
            raw = scorer.score(w)
            if slot.shadow is not None:
                self._shadow(w, raw, time.perf_counter() - t0)
        self._sanitise(raw)
        fb = self.feedback
        # Per-window summaries only where something reads them now: labels to compare
        # with, or a drift monitor; the feedback head keeps the windows for later labels.
        summaries = (window_summaries(w) if (fb is not None and fb.prototypes)
                     or self.drift is not None else None)
        if fb is not None and summaries is not None:
            level = cal.level() or 0.0
            raw = fb.adjust(raw, summaries, level).astype(np.float32)
        if self.post is not None:
            smoothed = cal.smooth(self.post.process(raw.astype(np.float64), newest))
        else:
            smoothed = cal.smooth(raw)
        opened = 0  # episodes this batch opened, for the summary
        if warm:
            # A detector that has not filled its reference yet scores exactly 0: that is
            # not a level to calibrate on.
            cal.learn_warm(smoothed[smoothed > 0] if scorer.learns else smoothed)
            anomaly = np.zeros(n, np.float32)
            episode = np.zeros(n, np.int64)
        else:
            logs = cal.log_scores(smoothed)  # what calibrate and adapt both take
            anomaly = cal.calibrate(smoothed, logs)
            thr = cal.threshold
            episode, changes = self.episodes.update(smoothed, thr, ts)
            normal = smoothed <= (thr if thr is not None else math.inf)
            # None: no window of the batch is in an episode (nothing to mask).
            calm = episode == 0 if np.count_nonzero(episode) else None
            if calm is not None:
                normal &= calm
                long = self._relearning(episode, ts, changes)
                if long is not None:  # taken as the new normal: learnt from as normal
                    normal |= long
                    calm |= long
            cal.adapt(smoothed[normal], logs[normal])
            if scorer.learns and normal.any():  # a scorer without state learns nothing
                learn_masked = getattr(scorer, "learn_masked", None)
                if learn_masked is not None:  # reuses what scoring this batch computed
                    learn_masked(w, normal)
                else:
                    scorer.learn(w[normal])
            if inputs is not None:
                # Outside episodes the scaling follows the machine, drift included: a level
                # that crept up is the new normal. Inside one it stays where it was.
                if calm is not None:  # the windows' samples are side by side in each row
                    inputs = inputs.reshape(c, n, -1)[:, calm].reshape(c, -1)
                self.scaling.track_columns(inputs)
            card = slot.card
            opened = sum(1 for ch in changes if not isinstance(ch, EpisodeClosed))
            for ch in changes:
                i = ch.index
                if isinstance(ch, EpisodeClosed):
                    relearn = cfg.adapt.relearn_after_s
                    events.append(Episode("resolved", cfg.name, ch.episode, ch.ended, ch.started,
                                          ch.peak_score, thr or 0.0, float(anomaly[i]),
                                          card.name, card.version, cfg.window, ch.ended,
                                          ch.duration_s,
                                          0 < relearn <= ch.duration_s))
                else:
                    events.append(Episode("alert", cfg.name, ch.episode, ch.ts, ch.started,
                                          ch.score, ch.threshold, float(anomaly[i]), card.name,
                                          card.version, cfg.window))
        if fb is not None:
            if at is None:
                fb.remember(ts, w)
            else:  # kept with the rest of the read (batches of a read are side by side)
                first = at if self._to_remember is None else self._to_remember[0]
                self._to_remember = (first, at + n)
        if self.drift is not None and summaries is not None:
            drifts = self.drift.update(raw.astype(np.float64), summaries[:, :c])
            t = float(ts[-1])
            if drifts and not 0 <= t - self.last_drift_ts < cfg.adapt.drift_cooldown_s:
                self.last_drift_ts = t
                events.append(Drift(cfg.name, t, drifts, cfg.adapt.drift, cal.threshold,
                                    slot.card.name, slot.card.version))
        self.windows_scored += n
        self.last_score = float(raw[-1])
        end_ts = ts.copy()  # read, never written: the summary and the event share it
        if self.summary.enabled:
            self._scored.append((raw, end_ts, opened))
        events.append(ScoreBatch(cfg.name, end_ts, idx.copy(), raw.copy(), smoothed,
                                 anomaly, episode, cal.threshold, warm))

    def _relearning(self, episode: I64, ts: F64,
                    changes: list[EpisodeOpened | EpisodeClosed]) -> npt.NDArray[np.bool_] | None:
        """The windows of episodes open ``adapt.relearn_after_s`` or longer (None: none).

        Inside an episode nothing adapts, so a fault does not teach itself into the normal;
        but when the normal itself moved, the scores stay up and the episode never ends.
        Past this age the episode's windows are learnt from like normal ones, and it closes
        once the threshold, the scaling and the detector have followed.
        """
        relearn = self.cfg.adapt.relearn_after_s
        if relearn <= 0:
            return None
        rule = self.episodes
        began = {ch.episode: ch.started for ch in changes}
        began.setdefault(rule.episode, rule.started)
        long = None
        for k in np.unique(episode[episode > 0]).tolist():
            t0 = began.get(k)
            if t0 is None or not ts[-1] - t0 >= relearn:
                continue
            mask = (episode == k) & (ts - t0 >= relearn)
            long = mask if long is None else long | mask
        return long

    def _swapped(self) -> None:
        """A fleet swap happened (under the lock): take the new card's statistics and
        calibration now, so this very batch and any checkpoint use them."""
        slot = self.slot
        self.scaling.use_card(slot.card.mean, slot.card.std)
        c = slot.calibration
        if c is not None:
            self.calibrator.rebase(c.threshold, c.log_level, c.log_spread)
            log.info("stream %s: threshold %.4g for model %s v%d", self.cfg.name, c.threshold,
                     slot.card.name, slot.card.version)

    def _shadow(self, w: F32, raw: F32, seconds: float) -> None:
        """A fleet canary or watch scores the same windows; it must never cost the batch."""
        hook = self.slot.shadow
        assert hook is not None
        try:
            hook(ShadowBatch(w, raw, seconds, self.calibrator.threshold, self.slot))
        except Exception as e:
            log.exception("model trial on %s raised; failing it", self.cfg.name)
            fail = getattr(hook, "fail", None)
            if fail is not None:
                fail(self.slot, f"the trial raised {type(e).__name__}: {e}")
            if self.slot.shadow is hook:
                self.slot.shadow = None

    def _sanitise(self, raw: F32) -> None:
        """Make every score finite and at most SCORE_MAX, in place; count what was not."""
        if raw.size == 0:
            return
        # One BLAS call for the common case: a finite sum of squares means every score
        # is finite and far below SCORE_MAX (float32's largest square root is ~1.8e19).
        # Anything else takes the exact checks below.
        if raw.ndim == 1 and raw.dtype == np.float32 and math.isfinite(float(np.vdot(raw, raw))):
            return
        lo, hi = float(np.minimum.reduce(raw)), float(np.maximum.reduce(raw))
        if math.isfinite(lo) and math.isfinite(hi):  # no NaN either: it would propagate
            if hi > SCORE_MAX:
                np.minimum(raw, SCORE_MAX, out=raw)
            return
        bad = ~np.isfinite(raw)
        if bad.any():
            if self.nonfinite_scores == 0:
                card = self.slot.card
                log.error("stream %s: model %s v%d produced a NaN or infinite score; such "
                          "windows score as the largest value (they alert) and are counted "
                          "in the status", self.cfg.name, card.name, card.version)
            self.nonfinite_scores += int(bad.sum())
            # An overflow is an extreme reading: it should alert, not poison the JSON.
            np.nan_to_num(raw, copy=False, nan=SCORE_MAX, posinf=SCORE_MAX, neginf=0.0)
        np.minimum(raw, SCORE_MAX, out=raw)

    # -- summaries, feedback, reload --------------------------------------------------

    def flush_summary(self, force: bool = False) -> Summary | None:
        """The summary whose period ended (a partial one when ``force``), if any."""
        now = self._clock()
        with self.lock:
            s = self.summary
            if not (s.due(now) or (force and s.start is not None)):
                return None
            body = s.flush()
            card = self.slot.card
        if body is None:
            return None
        body.update(stream=self.cfg.name, ts=body["end"], model=card.name,
                    model_version=card.version)
        return Summary(self.cfg.name, body)

    def label(self, ts: float, label: str) -> bool:
        """Operator feedback on the recent window ending nearest ``ts``; False if unknown."""
        with self.lock:
            return self.feedback is not None and self.feedback.label(ts, label)

    def reconfigure(self, cfg: StreamConfig) -> None:
        """Apply a reloaded stream config's alert section (the rest needs a restart)."""
        with self.lock:
            al = cfg.alert
            fixed = None if al.threshold == "auto" else float(al.threshold)
            if fixed is None and self.post is not None:
                fixed = cfg.postprocess.threshold  # a likelihood's threshold is not learnt
            self.calibrator.reconfigure(fixed, al.quantile, al.margin)
            self.episodes.reconfigure(al.consecutive, al.clear_windows, al.clear_ratio,
                                      al.cooldown_s, al.onset_windows)
            self.cfg = cfg

    def status(self) -> dict[str, Any]:
        """Per-stream figures for the status message and the health endpoint."""
        thr = self.calibrator.threshold
        fb = self.feedback
        level = self.calibrator.level()
        return {
            "model": self.card.name,
            "model_version": self.card.version,
            "state": self.state,
            "samples": self.samples,
            "windows": self.windows_scored,
            "nonfinite_scores": self.nonfinite_scores,
            "windows_dropped": self.ring.windows_dropped,
            "alerts": self.alerts,
            "episode": self.episodes.episode,
            "threshold": thr if thr is not None and math.isfinite(thr) else None,
            "score_level": round(level, 6) if level is not None else None,
            "drift_events": self.drift.detections if self.drift is not None else 0,
            "labels": dict(fb.labels) if fb is not None else {},
        }

    # -- state ------------------------------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(fingerprint, state) taken together under the lock; None while warming up.

        A stream still in warm-up is not saved: its warm-up windows are not part of the
        state, so a restart recalibrates from a full warm-up instead of ending one with
        what it saw after the restart (a threshold from too few windows, or none).
        """
        with self.lock:
            if self.calibrator.warm:
                return None
            return fingerprint(self.cfg, self.slot.card), self.to_state()

    def to_state(self) -> dict[str, Any]:
        """Everything learnt, as JSON values and numpy arrays (taken under the lock)."""
        with self.lock:
            return {
                "seen": self.seen,
                "scaling": self.scaling.to_state(),
                "calibrator": self.calibrator.to_state(),
                "episodes": self.episodes.to_state(),
                "scorer": self.slot.scorer.to_state(),
                "feedback": self.feedback.to_state() if self.feedback is not None else None,
                "post": self.post.to_state() if self.post is not None else None,
            }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint into this fresh pipeline; StateError when it does not fit."""
        with self.lock:
            try:
                self.scaling.load_state(state["scaling"])
                self.calibrator.load_state(state["calibrator"])
                self.episodes.load_state(state["episodes"])
                self.slot.scorer.load_state(state["scorer"])
                if self.feedback is not None and state.get("feedback") is not None:
                    self.feedback.load_state(state["feedback"])
                if self.post is not None:
                    if state.get("post") is None:
                        raise StateError("the checkpoint has no post-processing state")
                    self.post = PostProcessor.from_state(state["post"])
                self.seen = self.offset = int(state["seen"])
            except StateError:
                raise
            except Exception as e:  # whatever a damaged state raises: recalibrate instead
                raise StateError(f"{type(e).__name__}: {e}") from e
            if self.calibrator.warm:
                raise StateError("saved during warm-up")
            self.stash = None
            self._episode_base = self.episodes.episode
