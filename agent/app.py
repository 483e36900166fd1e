"""The agent: wires ingest, buffers, inference, alert rules, outbox and uplink."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt

from agent import __version__
from agent.buffers import RingBuffer
from agent.config import AgentConfig, StreamConfig
from agent.decide import AlertDecision, AlertRule
from agent.decode import DecodeError, decode
from agent.features import Normaliser
from agent.model import ModelCard, ModelError, Scorer, find_model, load_card
from agent.mqtt import make_client
from agent.outbox import Outbox, OutboxFullError
from agent.rates import RateMeter
from agent.reload import config_changes, is_live, merge_live
from agent.uplink import Uplink

__all__ = ["Agent", "BadInputLog", "StreamRuntime"]

log = logging.getLogger(__name__)

# The inference thread wakes at least this often even without new windows,
# to keep housekeeping (status, liveness) going.
IDLE_TICK_S = 0.5
# Distinct (kind, topic) pairs remembered for bad-input logging; beyond this,
# new topics are counted under "*" so a misbehaving sensor cannot grow memory.
BAD_INPUT_KEYS_MAX = 1000


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


@dataclass
class StreamRuntime:
    """Everything one stream owns at run time."""

    cfg: StreamConfig
    card: ModelCard
    scorer: Scorer
    ring: RingBuffer
    rule: AlertRule
    normaliser: Normaliser
    topic: str
    windows: npt.NDArray[np.float32] = field(init=False)
    end_ts: npt.NDArray[np.float64] = field(init=False)
    end_index: npt.NDArray[np.int64] = field(init=False)
    messages: int = 0
    samples: int = 0
    windows_scored: int = 0
    last_score: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one scorer user at a time

    def __post_init__(self) -> None:
        b, w, c = self.cfg.batch, self.cfg.window, len(self.cfg.fields)
        self.windows = np.zeros((b, w, c), dtype=np.float32)
        self.end_ts = np.zeros(b, dtype=np.float64)
        self.end_index = np.zeros(b, dtype=np.int64)


Observer = Callable[[StreamRuntime, npt.NDArray[np.float32], list[AlertDecision]], None]


def open_stream(cfg: AgentConfig, s: StreamConfig) -> tuple[ModelCard, Scorer]:
    """Load and check a stream's model; raise ModelError with a reason."""
    card = load_card(find_model(s.model, Path(cfg.base_dir)))
    if card.window != s.window:
        raise ModelError(f"model {card.name} takes windows of {card.window} samples; "
                         f"stream has window {s.window}")
    if len(card.fields) != len(s.fields):
        raise ModelError(f"model {card.name} takes {len(card.fields)} channels; "
                         f"stream has {len(s.fields)} fields")
    return card, Scorer(card, s.batch)


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
        up = cfg.upstream
        for i, s in enumerate(cfg.streams):
            try:
                card, scorer = open_stream(cfg, s)
            except ModelError as e:
                raise ModelError(f"streams[{i}].model: {e}") from e
            self.streams.append(StreamRuntime(
                cfg=s, card=card, scorer=scorer,
                ring=RingBuffer(s.buffer, len(s.fields), s.window, s.hop),
                rule=AlertRule(s.alert, s.warmup),
                normaliser=Normaliser(s.normalise, card.mean, card.std, s.warmup // 2),
                topic=f"{up.prefix}/{cfg.device_id}/alert/{s.name}",
            ))
        state = cfg.resolve(cfg.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(state / "outbox.db", synchronous=cfg.outbox.synchronous,
                             max_rows=cfg.outbox.max_rows, clock=clock)
        self.uplink = Uplink(cfg, self.outbox, self.status, clock=clock)
        self.local = make_client(cfg, cfg.local, "ingest", protocol=mqtt.MQTTv311,
                                 persistent=cfg.local.qos > 0)
        self.local.on_connect = self._on_local_connect
        self.local.on_disconnect = self._on_local_disconnect
        self.local.on_message = self._on_unknown_topic
        self.local_connected = threading.Event()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        for st in self.streams:
            self.local.message_callback_add(st.cfg.topic, self._stream_callback(st))
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
            client.subscribe(topics)
            self.local_connected.set()
            log.info("local broker connected (%s:%s); subscribed to %s", self.cfg.local.host,
                     self.cfg.local.port, ", ".join(t for t, _ in topics))
        except Exception:
            self.callback_errors += 1
            log.exception("error in local on_connect")

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
                for hook in self.step_hooks:
                    hook()
            except Exception:
                log.exception("inference step failed")
            self.last_progress = time.monotonic()

    def process_ready(self) -> int:
        """Score every ready window of every stream; return how many were scored."""
        return sum(self._process_stream(st) for st in self.streams)

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
            k0 = self._learn_normalisation(st, n)
            if k0 == n:
                continue
            windows = st.windows[k0:n]
            st.normaliser.apply(windows)
            scores = st.scorer.score(windows)
            decisions = st.rule.update(scores, st.end_index[k0:n], st.end_ts[k0:n])
            st.windows_scored += n - k0
            st.last_score = float(scores[-1])
            done += n - k0
            for d in decisions:
                self._emit_alert(st, d)
            if self._observer is not None:
                self._observer(st, scores, decisions)
        return done

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

    def _emit_alert(self, st: StreamRuntime, d: AlertDecision) -> None:
        def body(seq: int) -> dict[str, Any]:
            return {
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

        try:
            seq = self.outbox.put("alert", st.cfg.name, st.topic, body)
        except OutboxFullError as e:
            # Not accepted, so nothing is lost that was promised; say so loudly.
            self.outbox_errors += 1
            log.error("alert on %s not stored: %s", st.cfg.name, e)
            return
        log.info("alert %s seq=%d score=%.4g threshold=%.4g", st.cfg.name, seq, d.score,
                 d.threshold)
        self.uplink.notify()

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
            "evicted": ob["evicted"],
            "bad_input": self.bad_input.by_kind(),
            "streams": {
                st.cfg.name: {
                    "model": st.card.name,
                    "model_version": st.card.version,
                    "samples": st.samples,
                    "windows": st.windows_scored,
                    "windows_dropped": st.ring.windows_dropped,
                    "alerts": st.rule.alerts,
                    "threshold": st.rule.threshold,
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
                    st.cfg = s
        self.cfg = effective
        self.uplink.cfg = effective
        for path in changes:
            if is_live(path):
                log.info("reload: %s applied", path)
        return [p for p in changes if not is_live(p)]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
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
        self.uplink.stop(drain_timeout)
        self.outbox.close()
        log.info("edge-agent stopped")
