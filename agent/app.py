"""The agent: wires ingest, buffers, inference, alert rules, outbox and uplink."""

from __future__ import annotations

import json
import logging
import math
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt

from agent import __version__, state
from agent.adapt import (
    Detector,
    DriftEvent,
    GaussianDetector,
    HalfSpaceDetector,
    RunningScaler,
    StreamAdapter,
    build_adapter,
    fingerprint,
    river_card,
    window_summaries,
)
from agent.aggregate import SummaryAggregator
from agent.buffers import RingBuffer
from agent.config import AgentConfig, StreamConfig
from agent.decide import AlertDecision, AlertRule
from agent.decode import DecodeError, _timestamp, decode
from agent.features import Normaliser, WarmupStash
from agent.model import ModelCard, ModelError, Scorer, find_model, load_card
from agent.mqtt import make_client
from agent.outbox import Outbox
from agent.rates import RateMeter
from agent.reload import config_changes, is_live, merge_live
from agent.uplink import Uplink

if TYPE_CHECKING:
    from agent.fleet.manager import FleetManager

__all__ = ["Agent", "BadInputLog", "StreamRuntime"]

log = logging.getLogger(__name__)

# The inference thread wakes at least this often even without new windows,
# to keep housekeeping (status, liveness) going.
IDLE_TICK_S = 0.5
# Largest score a window can have (non-finite ones are set to it); far below
# float32's limit so later arithmetic (feedback doubles a score) stays finite.
SCORE_MAX = 1e30
# Distinct (kind, topic) pairs remembered for bad-input logging; beyond this,
# new topics are counted under "*" so a misbehaving sensor cannot grow memory.
BAD_INPUT_KEYS_MAX = 1000


def finite_or_none(x: float | None) -> float | None:
    """JSON has no infinity: an unset or infinite threshold goes upstream as null."""
    return x if x is not None and math.isfinite(x) else None


class BadInputLog:
    """Counts rejected input by kind and topic; logs the first of each pair once."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def add(self, kind: str, topic: str, detail: str) -> None:
        with self._lock:
            key = (kind, topic)
            if key not in self.counts and len(self.counts) >= BAD_INPUT_KEYS_MAX:
                key = (kind, "*")
            n = self.counts.get(key, 0)
            self.counts[key] = n + 1
        if n == 0:
            log.warning("dropped %s input on %s: %s (further ones on this topic are only counted)",
                        kind, topic, detail)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for (kind, _), n in self.counts.items():
                out[kind] = out.get(kind, 0) + n
        return out


ShadowHook = Callable[["StreamRuntime", npt.NDArray[np.float32], npt.NDArray[np.float32], float],
                      None]


@dataclass
class StreamRuntime:
    """Everything one stream owns at run time."""

    cfg: StreamConfig
    card: ModelCard
    scorer: Scorer | Detector
    ring: RingBuffer
    rule: AlertRule
    normaliser: Normaliser
    summary: SummaryAggregator
    topic: str
    summary_topic: str
    adapter: StreamAdapter | None = None
    warmup_stash: WarmupStash | None = None
    event_topic: str = ""
    last_drift_ts: float = -math.inf
    windows: npt.NDArray[np.float32] = field(init=False)
    end_ts: npt.NDArray[np.float64] = field(init=False)
    end_index: npt.NDArray[np.int64] = field(init=False)
    messages: int = 0
    samples: int = 0
    windows_scored: int = 0
    last_score: float | None = None
    nonfinite_scores: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # one scorer user at a time
    # Called under ``lock`` with each scored batch (windows, scores, seconds the
    # model call took): a fleet canary or watch scoring the same windows.
    shadow: ShadowHook | None = None

    def __post_init__(self) -> None:
        b, w, c = self.cfg.batch, self.cfg.window, len(self.cfg.fields)
        self.windows = np.zeros((b, w, c), dtype=np.float32)
        self.end_ts = np.zeros(b, dtype=np.float64)
        self.end_index = np.zeros(b, dtype=np.int64)


Observer = Callable[[StreamRuntime, npt.NDArray[np.float32], list[AlertDecision]], None]


def open_stream(cfg: AgentConfig, s: StreamConfig
                ) -> tuple[ModelCard, Scorer | Detector]:
    """Load and check a stream's model (a fleet-delivered one if active); ModelError if unfit."""
    if s.model == "none":
        a = s.adapt
        if a.detector == "gaussian":
            return river_card(s), GaussianDetector(s.fields, hop=s.hop,
                                                   halflife=a.gauss_halflife,
                                                   short=a.gauss_short, seed=a.seed)
        return river_card(s), HalfSpaceDetector(
            s.fields, n_trees=a.hst_trees, height=a.hst_height,
            window_size=a.hst_window, seed=a.seed)
    card = load_card(find_model(s.model, Path(cfg.base_dir)))
    if not cfg.fleet.enabled:
        return _check_fit(card, s), Scorer(card, s.batch)
    # Imported only when fleet delivery is on: it pulls in cryptography (~10 MB RSS).
    from agent.fleet.manager import stored_card_for  # noqa: PLC0415

    delivered = stored_card_for(cfg, card)
    if delivered is not card:
        try:
            return _check_fit(delivered, s), Scorer(delivered, s.batch)
        except ModelError as e:
            log.error("delivered model %s v%d unusable here, using the configured one: %s",
                      delivered.name, delivered.version, e)
    return _check_fit(card, s), Scorer(card, s.batch)


def _check_fit(card: ModelCard, s: StreamConfig) -> ModelCard:
    if card.window != s.window:
        raise ModelError(f"model {card.name} takes windows of {card.window} samples; "
                         f"stream has window {s.window}")
    if len(card.fields) != len(s.fields):
        raise ModelError(f"model {card.name} takes {len(card.fields)} channels; "
                         f"stream has {len(s.fields)} fields")
    return card


class Agent:
    """One edge-agent process's worth of pipeline. ``start()``, then ``stop()``."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self._observer = observer
        self.bad_input = BadInputLog()
        self.started_at = clock()
        self.callback_errors = 0
        self.outbox_errors = 0
        self.streams: list[StreamRuntime] = []
        self.fleet_recovered: dict[str, Any] | None = None
        if cfg.fleet.enabled:
            # Before any model loads: a trial the last run died in is undone first.
            from agent.fleet.manager import recover_interrupted_trial  # noqa: PLC0415

            self.fleet_recovered = recover_interrupted_trial(cfg)
        up = cfg.upstream
        for i, s in enumerate(cfg.streams):
            try:
                card, scorer = open_stream(cfg, s)
            except ModelError as e:
                raise ModelError(f"streams[{i}].model: {e}") from e
            normaliser, adapter = build_adapter(s, card, scorer)
            self.streams.append(StreamRuntime(
                cfg=s, card=card, scorer=scorer,
                ring=RingBuffer(s.buffer, len(s.fields), s.window, s.hop),
                rule=AlertRule(s.alert, s.warmup),
                normaliser=normaliser,
                summary=SummaryAggregator(s.fields, s.summary_s),
                topic=f"{up.prefix}/{cfg.device_id}/alert/{s.name}",
                summary_topic=f"{up.prefix}/{cfg.device_id}/summary/{s.name}",
                adapter=adapter,
                event_topic=f"{up.prefix}/{cfg.device_id}/event/{s.name}",
            ))
        state_dir = cfg.resolve(cfg.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        for st in self.streams:
            self._restore(st)
            if st.cfg.model != "none" and not st.normaliser.frozen:
                st.warmup_stash = WarmupStash(st.cfg.warmup // st.cfg.hop + 1, st.cfg.window,
                                              len(st.cfg.fields))
        self._last_checkpoint = time.monotonic()
        ob = cfg.outbox
        self.outbox = Outbox(state_dir / "outbox.db", synchronous=ob.synchronous,
                             max_rows=ob.max_rows, max_bytes=ob.max_bytes,
                             ttl_s={"alert": ob.ttl_alert_s, "summary": ob.ttl_summary_s},
                             clock=clock)
        self.uplink = Uplink(cfg, self.outbox, self.status, clock=clock)
        self.fleet: FleetManager | None = None
        if cfg.fleet.enabled:
            from agent.fleet.manager import FleetManager  # noqa: PLC0415

            self.fleet = FleetManager(self, clock=clock)
        self.local = make_client(cfg, cfg.local, "ingest", protocol=mqtt.MQTTv311,
                                 persistent=cfg.local.qos > 0)
        self.local.on_connect = self._on_local_connect
        self.local.on_disconnect = self._on_local_disconnect
        self.local.on_subscribe = self._on_local_subscribe
        self._subscribe_mid: int | None = None
        self.local.on_message = self._on_unknown_topic
        self.local_connected = threading.Event()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        for st in self.streams:
            self.local.message_callback_add(st.cfg.topic, self._stream_callback(st))
            if st.cfg.adapt.feedback:
                self.uplink.subscribe(f"{up.prefix}/{cfg.device_id}/feedback/{st.cfg.name}", 1,
                                      self._feedback_callback(st))
        self._worker: threading.Thread | None = None
        self.last_progress = time.monotonic()
        # Run on the inference thread after every step, idle or not (the service
        # layer hangs its test-only fault hook here); one that raises is logged.
        self.step_hooks: list[Callable[[], None]] = []
        # Monotonic, not the wall clock: a Pi without an RTC jumps years when NTP syncs.
        self.rates = RateMeter(clock=time.monotonic)

    # -- ingest (paho network thread): never raise ------------------------------------

    def _on_local_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                          reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                log.warning("local broker refused the connection: %s", reason_code)
                return
            # Subscriptions do not survive a broker restart without a persistent
            # session, so subscribe on every connect.
            topics = [(st.cfg.topic, self.cfg.local.qos) for st in self.streams]
            _, self._subscribe_mid = client.subscribe(topics)
            log.info("local broker connected (%s:%s); subscribing", self.cfg.local.host,
                     self.cfg.local.port)
        except Exception:
            self.callback_errors += 1
            log.exception("error in local on_connect")

    def _on_local_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                            reason_codes: list[Any], properties: Any) -> None:
        # Connected is not enough: until the SUBACK, the broker drops what sensors send.
        try:
            if mid != self._subscribe_mid:
                return
            topics = [st.cfg.topic for st in self.streams]
            refused = [t for t, rc in zip(topics, reason_codes, strict=False) if rc.is_failure]
            for t in refused:
                log.error("local broker refused the subscription to %s", t)
            self.local_connected.set()
            log.info("subscribed to %s", ", ".join(t for t in topics if t not in refused))
        except Exception:
            self.callback_errors += 1
            log.exception("error in local on_subscribe")

    def _on_local_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                             reason_code: Any, properties: Any) -> None:
        self.local_connected.clear()
        if not self._stopping.is_set():
            log.warning("local broker disconnected (%s); reconnecting", reason_code)

    def _on_unknown_topic(self, client: mqtt.Client, userdata: Any,
                          msg: mqtt.MQTTMessage) -> None:
        try:
            self.bad_input.add("unknown_topic", msg.topic, "no stream subscribes to it")
        except Exception:
            self.callback_errors += 1

    def _stream_callback(self, st: StreamRuntime) -> Callable[..., None]:
        fmt, fields, ring, batch = st.cfg.format, st.cfg.fields, st.ring, st.cfg.batch
        ready_event, clock, bad = self._ready, self._clock, self.bad_input

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                try:
                    ts, values = decode(msg.payload, fmt, fields, clock())
                except DecodeError as e:
                    bad.add(e.kind, msg.topic, str(e))
                    return
                st.messages += 1
                if isinstance(ts, np.ndarray):
                    ready = ring.extend(ts, values.T)  # type: ignore[union-attr]
                    st.samples += len(ts)
                else:
                    ready = ring.append(ts, values)  # type: ignore[arg-type]
                    st.samples += 1
                if ready >= batch:
                    # A full batch is waiting: score it on this thread. Handing it to
                    # the inference thread costs a GIL convoy (the waiting thread gets
                    # the GIL back only every switch interval), which lets a fast
                    # stream overrun the ring; scoring here also pushes back on ingest.
                    self._process_stream(st)
                elif ready:
                    ready_event.set()
            except Exception:
                self.callback_errors += 1
                log.exception("error handling a message on %s", msg.topic)

        return on_message

    # -- inference thread ------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            self._ready.wait(IDLE_TICK_S)
            self._ready.clear()
            try:
                self.process_ready()
                self.flush_summaries()
                for hook in self.step_hooks:
                    hook()
            except Exception:
                # Not progress: a step that fails every time must stop the watchdog pings.
                log.exception("inference step failed")
            else:
                self.last_progress = time.monotonic()
            if time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_s:
                self.save_state()

    def process_ready(self) -> int:
        """Score every ready window of every stream; return how many were scored."""
        return sum(self._process_stream(st) for st in self.streams)

    def replay_frame(self, st: StreamRuntime, ts: npt.NDArray[np.float64],
                     values: npt.NDArray[np.float32]) -> int:
        """Feed recorded (n,) times and (n, channels) values as one frame; score what is ready.

        What ``on_message`` does with a decoded frame, minus MQTT (``edge-agent replay``).
        """
        st.messages += 1
        st.ring.extend(ts, values)
        st.samples += len(ts)
        return self._process_stream(st)

    def _process_stream(self, st: StreamRuntime) -> int:
        # Blocking on purpose: if the inference thread is mid-batch, ingest waits
        # (releasing the GIL to it) instead of racing further ahead.
        with st.lock:
            return self._score_ready(st)

    def _score_ready(self, st: StreamRuntime) -> int:
        done = 0
        while True:
            n = st.ring.read(st.windows, st.end_ts, st.end_index, st.cfg.batch)
            if n == 0:
                break
            if st.summary.enabled:
                st.summary.add_samples(self._new_samples(st, n), self._clock())
            k0 = self._learn_normalisation(st, n)
            assert st.adapter is not None
            st.adapter.seen = int(st.end_index[n - 1]) + st.adapter.index_offset
            stash = st.warmup_stash
            if stash is not None:
                if k0:
                    stash.add(st.windows[:k0], st.end_ts[:k0], st.end_index[:k0])
                if st.normaliser.frozen:
                    st.warmup_stash = None
                    for i in range(0, len(stash), st.cfg.batch):
                        j = min(i + st.cfg.batch, len(stash))
                        done += self._score_windows(st, stash.windows[i:j], stash.end_ts[i:j],
                                                    stash.end_index[i:j])
            if k0 < n:
                done += self._score_windows(st, st.windows[k0:n], st.end_ts[k0:n],
                                            st.end_index[k0:n])
        return done

    def _score_windows(self, st: StreamRuntime, windows: npt.NDArray[np.float32],
                       end_ts: npt.NDArray[np.float64], raw_end_index: npt.NDArray[np.int64]
                       ) -> int:
        """Normalise (in place), score, adapt and decide one batch of raw windows."""
        ad = st.adapter
        assert ad is not None
        warm = raw_end_index + ad.index_offset <= st.cfg.warmup
        if warm[0] and not warm[-1]:
            # The batch straddles the end of warm-up: score its warm part first, so the
            # threshold exists for the rest (a fleet canary counts against it).
            k = int(np.argmin(warm))
            return (self._score_windows(st, windows[:k], end_ts[:k], raw_end_index[:k])
                    + self._score_windows(st, windows[k:], end_ts[k:], raw_end_index[k:]))
        if not warm[0] and st.rule.threshold is None:
            st.rule.finish_warmup()
        n = int(windows.shape[0])
        inputs = windows.copy() if st.cfg.adapt.input_halflife > 0 else None
        st.normaliser.apply(windows)
        summaries = window_summaries(windows)
        t0 = time.perf_counter()
        raw = st.scorer.score(windows)
        if st.shadow is not None:
            # A fleet canary/watch scores the same windows; it may replace raw
            # scores in place when a promoted model misbehaves.
            trial = st.shadow
            try:
                trial(st, windows, raw, time.perf_counter() - t0)
            except Exception as e:
                # A candidate model must never cost the live pipeline a batch.
                log.exception("model trial on %s raised; failing it", st.cfg.name)
                fail = getattr(trial, "fail", None)
                if fail is not None:
                    fail(st, windows, f"the trial raised {type(e).__name__}: {e}")
                if st.shadow is trial:
                    st.shadow = None
        self._sanitise_scores(st, raw)
        scores = ad.adjust(raw, summaries)
        end_index = raw_end_index + ad.index_offset
        decisions = st.rule.update(scores, end_index, end_ts)
        anomaly, normal, drifts = ad.after_rule(
            scores, end_index <= st.cfg.warmup, st.rule.threshold, windows=windows,
            summaries=summaries, end_ts=end_ts)
        if inputs is not None and isinstance(st.normaliser, RunningScaler):
            # Each window's newest `hop` samples: those no earlier window held.
            st.normaliser.track(inputs[normal, -st.cfg.hop:].reshape(-1, inputs.shape[2]))
        st.rule.threshold = ad.next_threshold(st.rule.threshold)
        ad.last_end_index, ad.last_anomaly = end_index, anomaly
        st.windows_scored += n
        st.last_score = float(scores[-1])
        st.summary.add_scores(scores, end_ts, len(decisions), self._clock())
        for d in decisions:
            self._emit_alert(st, d, float(anomaly[d.index]))
        if drifts:
            self._emit_drift(st, drifts, float(end_ts[-1]))
        if self._observer is not None:
            self._observer(st, scores, decisions)
        return n

    @staticmethod
    def _sanitise_scores(st: StreamRuntime, raw: npt.NDArray[np.float32]) -> None:
        """Make every score finite and at most SCORE_MAX, in place; count what was not finite."""
        bad = ~np.isfinite(raw)
        if bad.any():
            if st.nonfinite_scores == 0:
                log.error("stream %s: model %s v%d produced a NaN or infinite score; such "
                          "windows score as the largest value (they alert) and are counted "
                          "in the status", st.cfg.name, st.card.name, st.card.version)
            st.nonfinite_scores += int(bad.sum())
        # An overflow is an extreme reading: it should alert, not poison the JSON. The cap
        # leaves room for feedback to double a score without overflowing float32.
        np.nan_to_num(raw, copy=False, nan=SCORE_MAX, posinf=SCORE_MAX, neginf=0.0)
        np.minimum(raw, SCORE_MAX, out=raw)

    @staticmethod
    def _new_samples(st: StreamRuntime, n: int) -> npt.NDArray[np.float32]:
        """The samples the last read added: each window's newest ``hop`` rows."""
        hop, w = st.cfg.hop, st.cfg.window
        tail = st.windows[:n, w - hop:].reshape(-1, st.windows.shape[2])
        if st.end_index[0] == w:  # the stream's first window: all of it is new
            return np.concatenate([st.windows[0, : w - hop], tail])
        return tail

    def flush_summaries(self, force: bool = False) -> int:
        """Emit the summaries whose period ended (all of them when ``force``)."""
        now = self._clock()
        emitted = 0
        for st in self.streams:
            with st.lock:
                if not (st.summary.due(now) or (force and st.summary.start is not None)):
                    continue
                body = st.summary.flush()
            if body is None:
                continue
            body.update(device=self.cfg.device_id, stream=st.cfg.name, ts=body["end"],
                        model=st.card.name, model_version=st.card.version)

            def build(seq: int, body: dict[str, Any] = body) -> dict[str, Any]:
                return {**body, "seq": seq}

            if self._commit("summary", st, st.summary_topic, build) is not None:
                emitted += 1
        return emitted

    @staticmethod
    def _learn_normalisation(st: StreamRuntime, n: int) -> int:
        """Feed new samples to a learning normaliser; return the first window to score."""
        norm = st.normaliser
        k = 0
        while k < n and not norm.frozen:
            # Each window's newest `hop` rows are samples no earlier window held.
            new = st.cfg.window if st.end_index[k] == st.cfg.window else st.cfg.hop
            norm.learn(st.windows[k, -new:])
            k += 1
        return k

    def _emit_alert(self, st: StreamRuntime, d: AlertDecision,
                    anomaly_score: float | None = None) -> None:
        def body(seq: int) -> dict[str, Any]:
            extra = {} if anomaly_score is None else {"anomaly_score": round(anomaly_score, 6)}
            return {**extra,
                "device": self.cfg.device_id,
                "stream": st.cfg.name,
                "seq": seq,
                "ts": d.ts,
                "score": round(d.score, 6),
                "threshold": round(d.threshold, 6),
                "model": st.card.name,
                "model_version": st.card.version,
                "window": st.cfg.window,
            }

        seq = self._commit("alert", st, st.topic, body)
        if seq is not None:
            log.info("alert %s seq=%d score=%.4g threshold=%.4g", st.cfg.name, seq, d.score,
                     d.threshold)

    def _emit_drift(self, st: StreamRuntime, drifts: list[DriftEvent], ts: float) -> None:
        """One event per batch with drift, at most one per drift_cooldown_s (data time)."""
        if 0 <= ts - st.last_drift_ts < st.cfg.adapt.drift_cooldown_s:
            return
        st.last_drift_ts = ts

        def body(seq: int) -> dict[str, Any]:
            return {
                "device": self.cfg.device_id,
                "stream": st.cfg.name,
                "seq": seq,
                "ts": ts,
                "event": "drift",
                "detector": st.cfg.adapt.drift,
                "drifts": [{"kind": e.kind, "field": e.field, "estimate": round(e.estimate, 6)}
                           for e in drifts],
                "threshold": finite_or_none(st.rule.threshold),
                "model": st.card.name,
                "model_version": st.card.version,
            }

        seq = self._commit("event", st, st.event_topic, body)
        if seq is not None:
            log.info("drift on %s seq=%d: %s", st.cfg.name, seq,
                     ", ".join(e.field or e.kind for e in drifts))

    def _commit(self, kind: str, st: StreamRuntime, topic: str,
                body: Callable[[int], dict[str, Any]]) -> int | None:
        """Store an upstream message in the outbox and wake the uplink; its seq, or None."""
        try:
            seq = self.outbox.put(kind, st.cfg.name, topic, body)
        except (OSError, ValueError, sqlite3.Error) as e:
            # Not accepted (disk full, a database error, a body that is not JSON), so
            # nothing is lost that was promised; say so loudly and keep scoring.
            self.outbox_errors += 1
            log.error("%s on %s not stored: %s", kind, st.cfg.name, e)
            return None
        self.uplink.notify()
        return seq

    # -- feedback (uplink's paho thread; Uplink.subscribe catches what escapes) ----------

    def _feedback_callback(self, st: StreamRuntime) -> Callable[[mqtt.MQTTMessage], None]:
        def on_feedback(msg: mqtt.MQTTMessage) -> None:
            # JSON only: nothing from the network is ever unpickled.
            try:
                body = json.loads(msg.payload)
                if not isinstance(body, dict):
                    raise ValueError("not a JSON object")
                ts = _timestamp(body.get("ts", math.nan), math.nan)
                label = body.get("label")
                if label not in ("normal", "anomaly"):
                    raise ValueError(f"label must be normal or anomaly, got {label!r:.40}")
            except (ValueError, DecodeError) as e:
                self.bad_input.add("feedback", msg.topic, str(e))
                return
            ad = st.adapter
            with st.lock:
                found = ad is not None and ad.feedback is not None and ad.feedback.label(ts, label)
            if not found:
                self.bad_input.add("feedback_unknown_window", msg.topic,
                                   f"no recent window ends near ts {ts}")
                return
            log.info("feedback on %s: window at %s is %s", st.cfg.name, ts, label)

        return on_feedback

    # -- adaptation state ----------------------------------------------------------------

    def _restore(self, st: StreamRuntime) -> None:
        path = state.checkpoint_path(self.state_dir, st.cfg.name)
        try:
            saved = state.load(path, fingerprint(st.cfg, st.card))
        except state.StateMismatch as e:
            dest = state.set_aside(path)
            log.warning("adaptation state of %s not restored, starting fresh: %s (moved to %s)",
                        st.cfg.name, e, dest.name)
            return
        if saved is None:
            return
        st.normaliser, st.rule, st.adapter = saved["normaliser"], saved["rule"], saved["adapter"]
        st.rule.cfg = st.cfg.alert  # consecutive/cooldown may have changed; they hold no state
        ad = st.adapter
        assert ad is not None
        ad.index_offset = ad.seen
        if isinstance(st.scorer, HalfSpaceDetector | GaussianDetector) and ad.detector is not None:
            # The restored detector is the trained one: score with it, not a fresh copy.
            st.scorer = ad.detector
        log.info("adaptation state of %s restored (%d samples seen, threshold %s)",
                 st.cfg.name, ad.seen, st.rule.threshold)

    def save_state(self) -> None:
        """Checkpoint every stream's adaptation state under state_dir/adapt/."""
        self._last_checkpoint = time.monotonic()
        for st in self.streams:
            with st.lock:  # a consistent snapshot; the file is written outside the lock
                blob = pickle.dumps({"normaliser": st.normaliser, "rule": st.rule,
                                     "adapter": st.adapter}, protocol=pickle.HIGHEST_PROTOCOL)
            try:
                state.save(state.checkpoint_path(self.state_dir, st.cfg.name),
                           fingerprint(st.cfg, st.card), blob)
            except OSError as e:
                log.error("could not save adaptation state of %s: %s", st.cfg.name, e)

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        ob = self.outbox.stats()
        rates = self.rates.update({
            (st.cfg.name, k): v for st in self.streams
            for k, v in (("messages", st.messages), ("samples", st.samples),
                         ("windows", st.windows_scored))
        })
        return {
            "version": __version__,
            "uptime_s": round(self._clock() - self.started_at, 1),
            "backlog": ob["rows"],
            "backlog_bytes": ob["bytes"],
            "oldest_backlog_s": ob["oldest_age_s"],
            "evicted": ob["evicted"],
            "expired": ob["expired"],
            "outbox_errors": self.outbox_errors,
            "callback_errors": self.callback_errors + self.uplink.callback_errors,
            "bad_input": self.bad_input.by_kind(),
            **({"fleet": self.fleet.stats()} if self.fleet is not None else {}),
            "streams": {
                st.cfg.name: {
                    "model": st.card.name,
                    "model_version": st.card.version,
                    "samples": st.samples,
                    "windows": st.windows_scored,
                    "nonfinite_scores": st.nonfinite_scores,
                    "windows_dropped": st.ring.windows_dropped,
                    "alerts": st.rule.alerts,
                    "threshold": finite_or_none(st.rule.threshold),
                    **(st.adapter.status() if st.adapter is not None else {}),
                    "rate": {f"{k}_per_s": round(rates.get((st.cfg.name, k), 0.0), 2)
                             for k in ("messages", "samples", "windows")},
                }
                for st in self.streams
            },
        }

    def threads_alive(self) -> dict[str, bool]:
        """Whether each thread the pipeline needs is running (after ``start()``)."""

        def alive(t: threading.Thread | None) -> bool:
            return t is not None and t.is_alive()

        return {
            "inference": alive(self._worker),
            # paho's loop thread; an exception escaping a callback ends it silently.
            "local network": alive(self.local._thread),
            "upstream network": alive(self.uplink.client._thread),
            "uplink sender": self.uplink.alive(),
        }

    def reload(self, new: AgentConfig) -> list[str]:
        """Apply what can change live from a re-read config; return what needs a restart."""
        changes = config_changes(self.cfg, new)
        effective = merge_live(self.cfg, new)
        by_name = {s.name: s for s in effective.streams}
        for st in self.streams:
            s = by_name[st.cfg.name]
            if s.alert != st.cfg.alert:
                with st.lock:  # the rule is only touched under the stream's lock
                    st.rule.reconfigure(s.alert)
                    ad = st.adapter
                    if ad is not None:
                        # Re-base the adaptive threshold on the new one, or the next
                        # batch would put the old level back.
                        ad.adaptive_threshold = (s.alert.threshold == "auto"
                                                 and s.adapt.threshold_halflife > 0)
                        if st.rule.threshold is not None:
                            ad.calibrator.start(st.rule.threshold)
                    st.cfg = s
        self.cfg = effective
        self.uplink.cfg = effective
        for path in changes:
            if is_live(path):
                log.info("reload: %s applied", path)
        return [p for p in changes if not is_live(p)]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self.fleet is not None:
            self.fleet.start()
        self.uplink.start()
        loc = self.cfg.local
        self.local.connect_async(loc.host, loc.port, keepalive=loc.keepalive)
        self.local.loop_start()
        self._worker = threading.Thread(target=self._work, name="inference", daemon=True)
        self._worker.start()
        log.info("edge-agent %s started: device %s, %d stream(s)", __version__,
                 self.cfg.device_id, len(self.streams))

    def wait_connected(self, timeout: float) -> bool:
        """True once both brokers accepted the connection."""
        deadline = time.monotonic() + timeout
        return (self.local_connected.wait(timeout)
                and self.uplink.connected.wait(max(0.0, deadline - time.monotonic())))

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop ingest, score what is buffered, deliver what can be, go offline."""
        self._stopping.set()
        self.local.disconnect()
        self.local.loop_stop()
        if self._worker is not None:
            self._ready.set()
            self._worker.join(timeout=10)
        self.process_ready()  # windows that became ready after the last step
        self.flush_summaries(force=True)  # a partial period is still data
        self.save_state()
        if self.fleet is not None:
            self.fleet.stop()
        self.uplink.stop(drain_timeout)
        self.outbox.close()
        log.info("edge-agent stopped")
