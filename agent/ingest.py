"""Ingest: the local broker's client; each message is decoded and pushed into its stream."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from agent.config import AgentConfig
from agent.decode import BadInputLog, DecodeError, LogLimiter, decode
from agent.pipeline import Episode, Event, StreamPipeline
from agent.uplink.messages import with_clock_note
from agent.uplink.mqtt import RECONNECT_MAX_S, RECONNECT_MIN_S, ConnectionMonitor, make_client

__all__ = ["LocalIngest"]

log = logging.getLogger(__name__)

Sink = Callable[[StreamPipeline, list[Event]], None]
BodyFn = Callable[[int], dict[str, Any]]
# An alert whose window ends within this many seconds of a sample stamped with
# the agent's receive time (device clock unset) says so in its body.
CLOCK_UNSET_RECENT_S = 600.0


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
        self.client.on_message = self._on_unknown_topic
        for p in streams:
            self.client.message_callback_add(p.cfg.topic, self._stream_callback(p))

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

    def _on_unknown_topic(self, client: mqtt.Client, userdata: Any,
                          msg: mqtt.MQTTMessage) -> None:
        try:
            self.bad_input.add("unknown_topic", msg.topic, "no stream subscribes to it")
        except Exception:
            self.callback_errors += 1

    def _stream_callback(self, p: StreamPipeline) -> Callable[..., None]:
        fmt, fields, batch = p.cfg.format, p.cfg.fields, p.cfg.batch
        limit, min_ts, name = p.cfg.max_payload_bytes, self.cfg.min_valid_ts, p.cfg.name
        ready_event, clock, bad = self._ready, self._clock, self.bad_input

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                if len(msg.payload) > limit:
                    # Before decoding: a JSON frame costs ~10x its size in Python objects.
                    bad.add("oversize", msg.topic,
                            f"{len(msg.payload)} bytes > max_payload_bytes {limit}")
                    return
                now = clock()
                try:
                    ts, values = decode(msg.payload, fmt, fields, now)
                except DecodeError as e:
                    bad.add(e.kind, msg.topic, str(e))
                    return
                if np.any(np.asarray(ts) < min_ts):
                    # An unset device clock (1970): the receive time is the best we have.
                    n = int(np.count_nonzero(np.asarray(ts) < min_ts))
                    ts = np.where(ts < min_ts, now, ts) if isinstance(ts, np.ndarray) else now
                    self.clock_unset_at[name] = now
                    bad.note("clock_unset", msg.topic, f"{n} sample(s) stamped before "
                             f"min_valid_ts {min_ts:.0f}; using the agent's receive time", n)
                if not isinstance(ts, np.ndarray):
                    ready = p.append(ts, values)
                else:
                    ready = p.append(ts, np.asarray(values).T)
                if ready >= batch:
                    # A full batch is waiting: score it on this thread. Handing it to
                    # the inference thread costs a GIL convoy (the waiting thread gets
                    # the GIL back only every switch interval), which lets a fast
                    # stream overrun the ring; scoring here also pushes back on ingest.
                    self._sink(p, p.process())
                elif ready:
                    ready_event.set()
            except Exception:  # RecursionError included: paho's thread must survive
                self.callback_errors += 1
                self._errors_log.exception(f"ingest:{msg.topic}",
                                           "error handling a message on %s", msg.topic)

        return on_message

