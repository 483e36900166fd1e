"""Ingest: the local broker's client; each message is decoded and pushed into its stream.

One ``on_message`` dispatches by topic: a dict of the streams' exact topics
first, paho's wildcard matcher only for filters with ``+`` or ``#`` (its
answers cached, bounded). Readings go into the stream's ring; a full batch of
windows is scored here, fewer are left to the inference thread once the oldest
has waited ``max_delay_ms`` (:meth:`LocalIngest.until_due`, :meth:`LocalIngest.take_due`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.matcher import MQTTMatcher

from agent.config import AgentConfig
from agent.decode import BadInputLog, DecodeError, LogLimiter, decoder_for
from agent.pipeline import Episode, Event, StreamPipeline
from agent.uplink.messages import with_clock_note
from agent.uplink.mqtt import RECONNECT_MAX_S, RECONNECT_MIN_S, ConnectionMonitor, make_client

__all__ = ["LocalIngest"]

log = logging.getLogger(__name__)

Sink = Callable[[StreamPipeline, list[Event]], None]
BodyFn = Callable[[int], dict[str, Any]]
Handler = Callable[[bytes | bytearray, str], None]
# An alert whose window ends within this many seconds of a sample stamped with
# the agent's receive time (device clock unset) says so in its body.
CLOCK_UNSET_RECENT_S = 600.0
# Wildcard topics whose stream (or lack of one) is remembered; beyond this the
# matcher is asked each time, so a sensor inventing topics cannot grow memory.
RESOLVED_TOPICS_MAX = 4096


class LocalIngest:
    """Subscribes to every stream's topic; paho callbacks here never raise."""

    def __init__(self, cfg: AgentConfig, streams: list[StreamPipeline], *, bad: BadInputLog,
                 sink: Sink, ready: threading.Event, stopping: threading.Event,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.streams = streams
        self.bad_input = bad
        self._sink = sink
        self._ready = ready
        self._stopping = stopping
        self._clock = clock
        self.callback_errors = 0
        self._errors_log = LogLimiter(log)
        self.clock_unset_at: dict[str, float] = {}  # stream -> last receive time substituted
        self.connected = threading.Event()
        self._subscribe_mid: int | None = None
        self.client = make_client(cfg, cfg.local, "ingest", protocol=mqtt.MQTTv311,
                                  persistent=cfg.local.qos > 0)
        loc = cfg.local
        self.conn = ConnectionMonitor(self.client, "local", loc.host, loc.port,
                                      min_s=RECONNECT_MIN_S, max_s=RECONNECT_MAX_S)
        self.client.on_connect = self._on_local_connect
        self.client.on_connect_fail = self._on_local_connect_fail
        self.client.on_disconnect = self._on_local_disconnect
        self.client.on_subscribe = self._on_local_subscribe
        self.client.on_message = self._on_message
        # paho's dispatch (Client._handle_on_message, called for every PUBLISH) decodes
        # the topic twice and walks its message_callback_add filters, which this client
        # never uses, before it calls on_message: about 1 µs of every message. Here a
        # message goes straight to on_message, under the same callback mutex. A paho
        # that stops calling this method keeps its own dispatch: nothing else changes.
        self.client._handle_on_message = self._dispatch  # type: ignore[method-assign]
        # Stream name -> monotonic time by which its ready windows must be scored.
        self._due: dict[str, float] = {}
        self._by_name = {p.cfg.name: p for p in streams}
        self._exact: dict[str, Handler] = {}
        self._wildcards = MQTTMatcher()  # type: ignore[no-untyped-call]
        self._resolved: dict[str, Handler | None] = {}
        for p in streams:
            handler = self._stream_handler(p)
            if "+" in p.cfg.topic or "#" in p.cfg.topic:
                self._wildcards[p.cfg.topic] = handler
            else:
                self._exact[p.cfg.topic] = handler

    # -- paho network thread: never raise ------------------------------------------

    def _on_local_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                          reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                self.conn.refused(str(reason_code))
                return
            self.conn.connected()
            # Subscriptions do not survive a broker restart without a persistent
            # session, so subscribe on every connect.
            topics = [(p.cfg.topic, self.cfg.local.qos) for p in self.streams]
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
            topics = [p.cfg.topic for p in self.streams]
            refused = [t for t, rc in zip(topics, reason_codes, strict=False) if rc.is_failure]
            for t in refused:
                log.error("local broker refused the subscription to %s", t)
            self.connected.set()
            log.info("subscribed to %s", ", ".join(t for t in topics if t not in refused))
        except Exception:
            self.callback_errors += 1
            log.exception("error in local on_subscribe")

    def _on_local_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            # paho calls this inside its `except OSError`: the exception is the reason.
            self.conn.connect_failed(sys.exc_info()[1])
        except Exception:
            self.callback_errors += 1

    def _on_local_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                             reason_code: Any, properties: Any) -> None:
        try:
            self.connected.clear()
            if not self._stopping.is_set():
                self.conn.disconnected(str(reason_code))
        except Exception:
            self.callback_errors += 1

    def clock_unset_recently(self, stream: str, ts: float) -> bool:
        """Whether samples near ``ts`` on ``stream`` were stamped with the receive time."""
        at = self.clock_unset_at.get(stream)
        return at is not None and abs(ts - at) <= CLOCK_UNSET_RECENT_S

    def annotate(self, stream: str, e: Event, build: BodyFn) -> BodyFn:
        """An episode's body, noting when its time is the agent's (device clock unset)."""
        if isinstance(e, Episode) and self.clock_unset_recently(stream, e.ts):
            return with_clock_note(build)
        return build

    # -- batching: when the inference thread scores what ingest left -----------------------

    def until_due(self, idle_s: float) -> float:
        """Seconds until the oldest waiting window of any stream is due (at most ``idle_s``)."""
        due = list(self._due.values())
        if not due:
            return idle_s
        return min(idle_s, max(0.0, min(due) - time.monotonic()))

    def take_due(self) -> list[StreamPipeline]:
        """The streams whose oldest ready window has waited ``max_delay_ms``; their marks go.

        The mark goes before the caller scores: a window that becomes ready meanwhile
        sets a new one, so none waits for the idle tick.
        """
        now = time.monotonic()
        due = [name for name, at in list(self._due.items()) if at <= now]
        return [self._by_name[name] for name in due if self._due.pop(name, None) is not None]

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, message: mqtt.MQTTMessage) -> None:
        with self.client._in_callback_mutex:
            self._on_message(self.client, None, message)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
            handler = self._exact.get(topic)
            if handler is None:
                handler = self._match(topic)
                if handler is None:
                    self.bad_input.add("unknown_topic", topic, "no stream subscribes to it")
                    return
            handler(msg.payload, topic)
        except Exception:  # RecursionError included: paho's thread must survive
            self.callback_errors += 1
            self._errors_log.exception("ingest:on_message", "error handling a message")

    def _match(self, topic: str) -> Handler | None:
        """The handler of the wildcard filter ``topic`` matches (preflight refuses overlaps)."""
        try:
            return self._resolved[topic]
        except KeyError:
            pass
        matches = self._wildcards.iter_match(topic)  # type: ignore[no-untyped-call]
        handler: Handler | None = next(iter(matches), None)
        if len(self._resolved) < RESOLVED_TOPICS_MAX:
            self._resolved[topic] = handler
        return handler

    def _stream_handler(self, p: StreamPipeline) -> Handler:
        decode = decoder_for(p.cfg.format, tuple(p.cfg.fields))
        batch, name, limit = p.cfg.batch, p.cfg.name, p.cfg.max_payload_bytes
        delay_s, min_ts = p.cfg.max_delay_ms / 1000.0, self.cfg.min_valid_ts
        wake, clock, bad, due = self._ready, self._clock, self.bad_input, self._due
        monotonic = time.monotonic
        # When windows last became ready on this stream (monotonic); -inf: never.
        last_ready = [-float("inf")]

        def on_message(payload: bytes | bytearray, topic: str) -> None:
            try:
                if len(payload) > limit:
                    # Before decoding: a JSON frame costs ~10x its size in Python objects.
                    bad.add("oversize", topic, f"{len(payload)} bytes > max_payload_bytes {limit}")
                    return
                now = clock()
                try:
                    ts, values = decode(payload, now)
                except DecodeError as e:
                    bad.add(e.kind, topic, str(e))
                    return
                if isinstance(ts, np.ndarray):
                    # (ts < min_ts).any() in one reduction; fmin skips NaN as `<` does
                    if ts.size and float(np.fmin.reduce(ts)) < min_ts:
                        ts = self._clock_unset(name, topic, ts, now)
                    ready = p.append(ts, np.asarray(values).T)
                else:
                    if ts < min_ts:
                        ts = float(self._clock_unset(name, topic, ts, now))
                    ready = p.append(ts, values)
                if not ready:
                    return
                arrived, last_ready[0] = last_ready[0], monotonic()
                if ready >= batch or (name not in due
                                      and last_ready[0] - arrived >= delay_s):
                    # A full batch is waiting, or windows that came max_delay_ms or more
                    # after the last ones (at this rate no more come in time to batch
                    # with): score them on this thread. Handing them to the inference
                    # thread costs a wake-up plus the wait, and under load a GIL convoy
                    # (the waiting thread gets the GIL back only every switch interval)
                    # that lets a fast stream overrun the ring; scoring here also
                    # pushes back on ingest.
                    due.pop(name, None)
                    self._sink(p, p.process())
                elif name not in due:
                    # The first window of a batch: the inference thread scores whatever
                    # is ready once this one has waited max_delay_ms.
                    due[name] = last_ready[0] + delay_s
                    wake.set()
            except Exception:  # RecursionError included: paho's thread must survive
                self.callback_errors += 1
                self._errors_log.exception(f"ingest:{topic}",
                                           "error handling a message on %s", topic)

        return on_message

    def _clock_unset(self, name: str, topic: str, ts: Any, now: float) -> Any:
        """``ts`` with the samples stamped before ``min_valid_ts`` (an unset device clock,
        1970) replaced by the receive time: the best we have."""
        min_ts = self.cfg.min_valid_ts
        early = np.asarray(ts) < min_ts
        n = int(np.count_nonzero(early))
        self.clock_unset_at[name] = now
        self.bad_input.note("clock_unset", topic, f"{n} sample(s) stamped before min_valid_ts "
                            f"{min_ts:.0f}; using the agent's receive time", n)
        return np.where(early, now, ts) if isinstance(ts, np.ndarray) else now
