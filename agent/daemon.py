"""The daemon's wiring: MQTT callbacks decode and push into one pipeline per stream; the
events go to the outbox; a thread scores what ingest left; checkpoints, status, reload."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from agent import __version__, state
from agent.config import AgentConfig
from agent.decode import BadInputLog, DecodeError, _timestamp
from agent.ingest import LocalIngest
from agent.pipeline import Event, StreamPipeline, fingerprint
from agent.scoring import ModelError, StateError
from agent.scoring.registry import open_stream_model
from agent.service.rates import RateMeter
from agent.service.reload import config_changes, is_live, merge_live
from agent.uplink.committer import Committer, Pending
from agent.uplink.messages import message_for
from agent.uplink.outbox import Outbox
from agent.uplink.uplink import Uplink

if TYPE_CHECKING:
    from agent.fleet.manager import FleetManager

__all__ = ["Agent", "EventSink"]

log = logging.getLogger(__name__)

# The inference thread wakes at least this often even without new windows,
# to keep housekeeping (summaries, checkpoints, liveness) going.
IDLE_TICK_S = 0.5
# save_state() waits this long for the committer to catch up before it checkpoints.
CHECKPOINT_FLUSH_S = 5.0
EventSink = Callable[[StreamPipeline, list[Event]], None]


class Agent:
    """One edge-agent process's worth of pipeline. ``start()``, then ``stop()``."""

    def __init__(self, cfg: AgentConfig, *, clock: Callable[[], float] = time.time,
                 observer: EventSink | None = None) -> None:
        self.cfg = cfg
        self._clock = clock
        # Each sees every batch of events (tests, the live view, Home Assistant).
        self.observers: list[EventSink] = [observer] if observer is not None else []
        self.bad_input = BadInputLog()
        self.started_at = clock()
        self.callback_errors = 0
        self.fleet_recovered: dict[str, Any] | None = None
        if cfg.fleet.enabled:
            # Before any model loads: a trial the last run died in is undone first.
            from agent.fleet.manager import recover_interrupted_trial  # noqa: PLC0415

            self.fleet_recovered = recover_interrupted_trial(cfg)
        self.state_dir = cfg.resolve(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.streams = [self._open(i) for i in range(len(cfg.streams))]
        self._last_checkpoint = time.monotonic()
        ob = cfg.outbox
        self.outbox = Outbox(self.state_dir / "outbox.db", synchronous=ob.synchronous,
                             max_rows=ob.max_rows, max_bytes=ob.max_bytes,
                             ttl_s={"alert": ob.ttl_alert_s, "summary": ob.ttl_summary_s},
                             clock=clock)
        self.uplink = Uplink(cfg, self.outbox, self.status, clock=clock)
        self.committer = Committer(self.outbox, self.uplink.notify)
        self.fleet: FleetManager | None = None
        if cfg.fleet.enabled:
            from agent.fleet.manager import FleetManager  # noqa: PLC0415

            self.fleet = FleetManager(cfg, [p.slot for p in self.streams], self.uplink,
                                      recovered=self.fleet_recovered, clock=clock)
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self.ingest = LocalIngest(cfg, self.streams, bad=self.bad_input, sink=self._sink,
                                  ready=self._ready, stopping=self._stopping, clock=clock)
        self.local = self.ingest.client
        self.local_connected = self.ingest.connected
        up = cfg.upstream
        for p in self.streams:
            if p.cfg.adapt.feedback:
                self.uplink.subscribe(f"{up.prefix}/{cfg.device_id}/feedback/{p.cfg.name}", 1,
                                      self._feedback_callback(p))
        self._worker: threading.Thread | None = None
        self.last_progress = time.monotonic()
        # Run on the inference thread after every step, idle or not (the service
        # layer hangs its test-only fault hook here); one that raises is logged.
        self.step_hooks: list[Callable[[], None]] = []
        # Monotonic, not the wall clock: a Pi without an RTC jumps years when NTP syncs.
        self.rates = RateMeter(clock=time.monotonic)
        if cfg.homeassistant.enabled:  # subscribes on the uplink, so before start()
            from agent.homeassistant import attach  # noqa: PLC0415

            attach(self)

    def _open(self, i: int) -> StreamPipeline:
        s = self.cfg.streams[i]
        try:
            card, scorer = open_stream_model(self.cfg, s)
        except ModelError as e:
            raise ModelError(f"streams[{i}].model: {e}") from e
        p = StreamPipeline(s, card, scorer, clock=self._clock)
        path = state.checkpoint_path(self.state_dir, s.name)
        try:
            saved = state.load(path, fingerprint(s, card))
            if saved is not None:
                p.load_state(saved)
        except (state.StateMismatch, StateError) as e:
            dest = state.set_aside(path)
            log.warning("adaptation state of %s not restored, recalibrating from warm-up: %s "
                        "(moved to %s)", s.name, e, dest.name)
            return StreamPipeline(s, card, open_stream_model(self.cfg, s)[1], clock=self._clock)
        if saved is not None:
            log.info("adaptation state of %s restored (%d samples seen, threshold %s)",
                     s.name, p.seen, p.threshold)
        return p

    # -- inference thread ------------------------------------------------------------

    def _work(self) -> None:
        # Ingest scores full batches itself and wakes this thread when a stream's first
        # ready window appears; the thread sleeps until that window has waited the
        # stream's max_delay_ms, then scores everything ready in as few model calls as
        # the batch size allows.
        while not self._stopping.is_set():
            self._ready.wait(self.ingest.until_due(IDLE_TICK_S))
            self._ready.clear()
            try:
                for p in self.ingest.take_due():
                    self._sink(p, p.process())
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
        done = 0
        for p in self.streams:
            before = p.windows_scored
            self._sink(p, p.process())
            done += p.windows_scored - before
        return done

    def push(self, p: StreamPipeline, ts: Any, values: Any) -> list[Event]:
        """What ``on_message`` does with a decoded reading or frame, minus MQTT."""
        events = p.push(ts, values)
        self._sink(p, events)
        return events

    def flush_summaries(self, force: bool = False) -> int:
        """Emit the summaries whose period ended (all of them when ``force``)."""
        out = [s for p in self.streams if (s := p.flush_summary(force)) is not None]
        for p in self.streams:
            self._sink(p, [s for s in out if s.stream == p.cfg.name])
        return len(out)

    def _sink(self, p: StreamPipeline, events: list[Event]) -> None:
        """Queue each upstream event for the committer, which commits and wakes the uplink.

        Only queued here: the commit (one fsync for everything waiting) and the log
        line run on the committer thread, off the scoring path.
        """
        up, name = self.cfg.upstream, p.cfg.name
        pending = []
        for e in events:
            m = message_for(e, self.cfg.device_id, up.prefix)
            if m is not None:
                kind, topic, body = m
                body = self.ingest.annotate(name, e, body)  # device clock unset: say so
                pending.append(Pending((kind, name, topic, body), e))
        self.committer.submit(pending)
        for obs in self.observers if events else ():
            try:
                obs(p, events)
            except Exception:  # a view must never cost the outbox a message
                log.exception("event observer failed on %s", p.cfg.name)

    # -- feedback (uplink's paho thread; Uplink.subscribe catches what escapes) ----------

    def _feedback_callback(self, p: StreamPipeline) -> Callable[[mqtt.MQTTMessage], None]:
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
            except (ValueError, DecodeError, RecursionError) as e:  # deep nesting: RecursionError
                self.bad_input.add("feedback", msg.topic, str(e)[:200])
                return
            if not p.label(ts, label):
                self.bad_input.add("feedback_unknown_window", msg.topic,
                                   f"no recent window ends near ts {ts}")
                return
            log.info("feedback on %s: window at %s is %s", p.cfg.name, ts, label)

        return on_feedback

    # -- state, status, reload ---------------------------------------------------------

    def save_state(self) -> None:
        """Checkpoint every stream's learnt state under state_dir/adapt/.

        Only once the outbox holds every message queued so far: a checkpoint must not
        record an episode as open whose alert a crash could still lose (after a restart
        the episode would go on without ever having been reported).
        """
        self._last_checkpoint = time.monotonic()
        if not self.committer.flush(CHECKPOINT_FLUSH_S):
            log.warning("adaptation state not saved: %d message(s) still wait for the outbox "
                        "after %.0f s; trying again at the next checkpoint",
                        self.committer.backlog(), CHECKPOINT_FLUSH_S)
            return
        for p in self.streams:
            snap = p.checkpoint()  # a consistent snapshot; written outside the lock
            if snap is None:
                continue  # still warming up: nothing worth keeping yet
            try:
                state.save(state.checkpoint_path(self.state_dir, p.cfg.name), *snap)
            except OSError as e:
                log.error("could not save adaptation state of %s: %s", p.cfg.name, e)

    def status(self) -> dict[str, Any]:
        ob = self.outbox.stats()
        rates = self.rates.update({
            (p.cfg.name, k): v for p in self.streams
            for k, v in (("messages", p.messages), ("samples", p.samples),
                         ("windows", p.windows_scored))
        })
        return {
            "version": __version__,
            "uptime_s": round(self._clock() - self.started_at, 1),
            "backlog": ob["rows"],
            "backlog_bytes": ob["bytes"],
            "oldest_backlog_s": ob["oldest_age_s"],
            "evicted": ob["evicted"],
            "expired": ob["expired"],
            "outbox_errors": self.committer.errors + self.outbox.write_errors,
            "outbox": self.outbox.health(),
            "committer": self.committer.stats(),
            "callback_errors": self.callback_errors + self.uplink.callback_errors,
            "bad_input": self.bad_input.by_kind(),
            "local": {"connected": self.local_connected.is_set(), **self.ingest.conn.stats()},
            **({"fleet": self.fleet.stats()} if self.fleet is not None else {}),
            "streams": {
                p.cfg.name: {**p.status(),
                             "rate": {f"{k}_per_s": round(rates.get((p.cfg.name, k), 0.0), 2)
                                      for k in ("messages", "samples", "windows")}}
                for p in self.streams
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
            "committer": self.committer.alive(),
        }

    def reload(self, new: AgentConfig) -> list[str]:
        """Apply what can change live from a re-read config; return what needs a restart."""
        changes = config_changes(self.cfg, new)
        effective = merge_live(self.cfg, new)
        by_name = {s.name: s for s in effective.streams}
        for p in self.streams:
            s = by_name[p.cfg.name]
            if s.alert != p.cfg.alert:
                p.reconfigure(s)
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
        self.committer.start()
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
        self.committer.stop()  # the uplink drains only what is committed
        if self.fleet is not None:
            self.fleet.stop()
        self.uplink.stop(drain_timeout)
        self.outbox.close()
        log.info("edge-agent stopped")
