"""The cloud connection: drains the outbox in seq order, publishes status.

One sender thread owns the publish side: acks, replay pacing, retries, status.
The one exception is the live fast path: when nothing holds sending back, the
committer hands freshly committed rows to paho itself (``notify``), under the
same lock as the sender's step, which saves the alert a thread wake-up.
paho callbacks only append to deques and set an event: ``on_publish`` runs
while paho holds its out-message mutex, so taking any lock of ours there could
deadlock against ``publish()``; and an exception escaping a callback would
silently kill paho's network thread.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import AgentConfig
from agent.decode import LogLimiter
from agent.uplink.mqtt import ConnectionMonitor, connect_properties, make_client
from agent.uplink.outbox import Outbox

__all__ = ["Uplink"]

log = logging.getLogger(__name__)

# After a PUBACK with a failure reason code, wait this long before retrying
# (doubling up to the cap) so a broker that denies us is not hammered.
RETRY_AFTER_FAILURE_S = 2.0
RETRY_AFTER_FAILURE_MAX_S = 60.0
SENDER_TICK_S = 0.1
EXPIRE_EVERY_S = 60.0
# Delivered rows the outbox could not delete (full disk) are retried this often,
# doubling up to the cap; nothing new is sent meanwhile (re-sending them would be
# a duplicate storm: the old outbox sent 27 rows 16,379 times in 30 s).
DELETE_RETRY_S = 0.5
DELETE_RETRY_MAX_S = 10.0


class Uplink:
    """Owns the upstream paho client and the outbox drain."""

    def __init__(
        self,
        cfg: AgentConfig,
        outbox: Outbox,
        status: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self._status = status
        self._clock = clock  # timestamps in messages
        self._mono = monotonic  # scheduling: immune to the clock steps of a Pi without RTC
        up = cfg.upstream
        self.status_topic = f"{up.prefix}/{cfg.device_id}/status"
        self._v5 = up.protocol == "5"
        self.client = make_client(cfg, up, "uplink",
                                  protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
                                  persistent=True)
        self.client.max_inflight_messages_set(up.max_inflight)
        self.client.will_set(self.status_topic, self._offline_payload(), qos=1, retain=True)
        self.conn = ConnectionMonitor(self.client, "upstream", up.host, up.port,
                                      min_s=up.reconnect_min_s, max_s=up.reconnect_max_s,
                                      monotonic=monotonic)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_unexpected_message
        self._subscriptions: dict[str, int] = {}  # cloud -> agent topic filters and QoS
        self._acks: collections.deque[tuple[int, bool, str]] = collections.deque()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._cursors = {"alert": 0, "other": 0}  # highest seq handed over, per class
        self._tokens = float(up.max_inflight)  # token bucket for replay_rate (backlog only)
        # Rows with a seq up to this are the backlog: committed while the uplink could
        # not send (link down, broker refusing, delivered rows not deletable, disk
        # full). Newer rows are live. Set each time sending resumes after such a stop.
        self._live_after = 0
        self._blocked = True  # not sending yet: the first connect starts a replay
        self._tokens_at = monotonic()
        self._next_expire = 0.0
        self._more = True  # the outbox may hold rows not yet handed over
        self._wake = threading.Event()
        # Held by whoever sends: the sender thread's step, or notify()'s fast path.
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self._just_connected = False
        self._retry_at = 0.0
        self._retry_delay = RETRY_AFTER_FAILURE_S
        self._next_status = 0.0
        self.delivered = 0
        self.rejected = 0
        self.connects = 0
        self.callback_errors = 0
        self._undeleted: list[int] = []  # delivered, but the outbox could not delete them
        self._delete_retry_at = 0.0
        self._delete_delay = DELETE_RETRY_S
        self.delete_failures = 0
        self._errors_log = LogLimiter(log)

    def _offline_payload(self) -> bytes:
        return json.dumps({"device": self.cfg.device_id, "status": "offline"}).encode()

    # -- paho callbacks (network thread): never raise -----------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                self.conn.refused(str(reason_code))
                return
            self.conn.connected()
            self.connects += 1
            log.info("upstream connected to %s:%s", self.cfg.upstream.host,
                     self.cfg.upstream.port)
            if self._subscriptions:
                # Resubscribe on every connect: a broker that lost our session
                # (restart without persistence) would otherwise stay silent.
                client.subscribe(list(self._subscriptions.items()))
            self._just_connected = True
            self.connected.set()
            self._wake.set()
        except Exception:
            self.callback_errors += 1
            log.exception("error in upstream on_connect")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            # paho calls this inside its `except OSError`: the exception is the reason.
            self.conn.connect_failed(sys.exc_info()[1])
        except Exception:
            self.callback_errors += 1

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: Any, properties: Any) -> None:
        try:
            self.connected.clear()
            if not self._stop.is_set():
                self.conn.disconnected(f"{reason_code} (backlog {len(self.outbox)})")
        except Exception:
            self.callback_errors += 1

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: Any, properties: Any) -> None:
        try:
            self._acks.append((mid, not reason_code.is_failure, str(reason_code)))
            self._wake.set()
        except Exception:
            self.callback_errors += 1

    def _on_unexpected_message(self, client: mqtt.Client, userdata: Any,
                               msg: mqtt.MQTTMessage) -> None:
        try:
            log.debug("upstream message on %s matches no subscription", msg.topic)
        except Exception:
            self.callback_errors += 1

    def subscribe(self, topic_filter: str, qos: int,
                  callback: Callable[[mqtt.MQTTMessage], None]) -> None:
        """Receive cloud -> agent messages (feedback, model manifests) on this connection.

        Call before ``start()``. ``callback`` runs on paho's network thread: it
        must be quick, and whatever it raises is caught, counted and logged here.
        """

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                callback(msg)
            except Exception:  # RecursionError included: paho's thread must survive
                self.callback_errors += 1
                self._errors_log.exception(f"upstream:{topic_filter}",
                                           "error handling upstream message on %s", msg.topic)

        self._subscriptions[topic_filter] = qos
        self.client.message_callback_add(topic_filter, on_message)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        up = self.cfg.upstream
        props = connect_properties(True, up.session_expiry_s) if self._v5 else None
        kwargs: dict[str, Any] = {"keepalive": up.keepalive}
        if self._v5:
            kwargs["clean_start"] = False
            kwargs["properties"] = props
        self.client.connect_async(up.host, up.port, **kwargs)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New rows are in the outbox: send them from this thread if nothing holds sending
        back and the sender is idle, else wake the sender.

        The committer calls this after each commit. Sending here saves the alert a
        wake-up of the sender thread, a few hundred microseconds more when the GIL or
        the CPU is busy; a backlog, a retry or a reconnect stays the sender's, which
        the conditions of ``_live()`` leave it.
        """
        self._more = True
        if self._live() and self._send_lock.acquire(blocking=False):
            try:
                if self._live():
                    self._send(self._mono())
            except Exception:  # the sender's next step tries again; never the commit's error
                self._errors_log.exception("uplink send", "uplink send after commit failed")
                self._more = True
            finally:
                self._send_lock.release()
            if not self._more:
                return
        self._wake.set()

    def _live(self) -> bool:
        """Whether rows may go out at once: connected, not replaying or backing off."""
        return (self.connected.is_set() and not self._stop.is_set() and not self._blocked
                and not self._just_connected and not self._undeleted
                and self._mono() >= self._retry_at)

    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Try to deliver the backlog for up to ``drain_timeout`` s, then go offline."""
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and self.connected.is_set() and len(self.outbox):
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._process_acks()
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, self._offline_payload(), qos=1,
                                       retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError) as e:
                log.debug("offline status not confirmed: %s", e)
        self.client.disconnect()
        self.client.loop_stop()

    # -- sender thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(SENDER_TICK_S)
            self._wake.clear()
            try:
                with self._send_lock:
                    self._step()
            except Exception:
                # Keep the thread alive: a failed step is retried on the next tick.
                self._errors_log.exception("uplink step", "uplink step failed")
                time.sleep(SENDER_TICK_S)

    def _process_acks(self) -> None:
        ok: list[int] = []
        while self._acks:
            mid, success, reason = self._acks.popleft()
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue  # the retained status, or a duplicate PUBACK
            if success:
                ok.append(seq)
            else:
                self.rejected += 1
                log.warning("upstream refused seq %d: %s; retrying in %.0f s",
                            seq, reason, self._retry_delay)
                self._retry_at = self._mono() + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, RETRY_AFTER_FAILURE_MAX_S)
                self._rescan()
        if ok:
            self._undeleted += ok
            self._delete_delivered()
            if not self._undeleted:
                self._retry_delay = RETRY_AFTER_FAILURE_S

    def _delete_delivered(self) -> None:
        """Delete delivered rows from the outbox; on failure keep them and retry later."""
        try:
            self.delivered += self.outbox.ack(self._undeleted)
        except (OSError, sqlite3.Error) as e:
            self.delete_failures += 1
            self._errors_log.log(logging.ERROR, "outbox: could not delete %d delivered row(s) "
                                 "(%s); sending nothing new until they are deleted",
                                 len(self._undeleted), e)
            self._delete_retry_at = self._mono() + self._delete_delay
            self._delete_delay = min(self._delete_delay * 2, DELETE_RETRY_MAX_S)
            return
        self._undeleted = []
        self._delete_delay = DELETE_RETRY_S

    def _rescan(self) -> None:
        """Next step, look at every row not in flight again, from the oldest."""
        self._cursors = {"alert": 0, "other": 0}
        self._more = True

    def _step(self) -> None:
        self._process_acks()
        now = self._mono()
        if self.outbox.maintain():
            self._more = True  # queued messages were committed: look for them
            self._blocked = True  # ... while the disk refused: they are a backlog
        if self._undeleted and now >= self._delete_retry_at:
            self._delete_delivered()
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_EVERY_S
            try:
                self.outbox.expire()
            except (OSError, sqlite3.Error) as e:
                self._errors_log.log(logging.ERROR, "outbox: expiry failed: %s", e)
        if not self.connected.is_set():
            self._blocked = True
            return
        if self._just_connected:
            self._just_connected = False
            self._rescan()
            self._next_status = 0.0
        if now >= self._next_status:
            self.publish_status()
            interval = self.cfg.upstream.status_interval_s
            self._next_status = now + interval * random.uniform(0.9, 1.1)
        if now < self._retry_at or self._undeleted:
            self._blocked = True
            return
        if self._blocked:
            # Sending again after a stop: what was committed meanwhile is the backlog.
            self._blocked = False
            self._live_after = self.outbox.last_seq
        if self._more:
            self._send(now)

    def _send(self, now: float) -> None:
        """Hand rows to paho in seq order per class, alerts first, within max_inflight.

        Live rows go at once; backlog rows (seq <= _live_after) each take a replay_rate
        token. A row waits for every older row of its class, and while backlog alerts
        wait for tokens nothing else goes.
        """
        up = self.cfg.upstream
        self._tokens = min(float(up.max_inflight),
                           self._tokens + (now - self._tokens_at) * up.replay_rate)
        self._tokens_at = now
        room = up.max_inflight - len(self._inflight)
        if room <= 0:
            return
        # Cleared before the query, so a notify() that races with it is not lost.
        self._more = False
        # Alerts first: a backlog of summaries must not hold back an alert.
        for cls, sel in (("alert", {"kinds": ["alert"]}), ("other", {"not_kinds": ["alert"]})):
            if room <= 0:
                break
            rows = self.outbox.pending(room, after=self._cursors[cls],
                                       exclude=self._inflight.values(), **sel)
            for row in rows:
                if row.seq <= self._live_after:
                    if self._tokens < 1.0:
                        # Paced: the next tick looks again. Nothing of a later class
                        # goes meanwhile, so alerts stay first through a replay.
                        self._more = True
                        return
                    self._tokens -= 1.0
                info = self.client.publish(row.topic, row.payload, qos=1)
                # paho mids wrap at 65535; with at most max_inflight handed over per
                # step and acks drained first, a mid is never reused while still mapped.
                self._inflight[info.mid] = row.seq
                self._cursors[cls] = row.seq
                room -= 1
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    # Not connected any more: paho keeps the QoS 1 message and sends it
                    # on reconnect; hand over nothing more until then.
                    self._more = True
                    return
        if room <= 0:
            self._more = True  # the window filled up: there may be more waiting

    def stats(self) -> dict[str, Any]:
        """Counters for the status message."""
        return {"connected": self.connected.is_set(), "connects": self.connects,
                "delivered": self.delivered, "rejected": self.rejected,
                "inflight": len(self._inflight), "undeleted": len(self._undeleted),
                "delete_failures": self.delete_failures, **self.conn.stats()}

    def publish_status(self) -> None:
        body = {"device": self.cfg.device_id, "status": "online", "ts": self._clock()}
        body.update(self._status())
        body["uplink"] = self.stats()
        body = _json_safe(body)
        self.client.publish(self.status_topic, json.dumps(body, separators=(",", ":")),
                            qos=1, retain=True)


def _json_safe(value: Any) -> Any:
    """The same structure with non-finite floats as null (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
