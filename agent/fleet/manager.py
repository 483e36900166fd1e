"""The agent's side of fleet delivery: receive, load, canary, swap, watch, roll back.

paho callbacks only queue payloads; one ``fleet`` worker thread does the
hashing, file writes, model loading and decisions. Scoring threads only see
a stream's ``shadow`` hook and, at a swap, a new ``scorer``/``card`` assigned
under the stream's lock: ingest waits at most for the model call in progress.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt

from agent.fleet.canary import Trial, TrialPolicy, Windows
from agent.fleet.manifest import MANIFEST_MAX_BYTES, ModelManifest, Refusal, public_key_from_b64
from agent.fleet.receiver import ModelReceiver, ReceiverLimits
from agent.fleet.store import ModelStore, StoredVersion
from agent.scoring import ModelCard, ModelError, ModelSlot, Scorer, load_card, open_scorer
from agent.scoring.slot import Calibration

if TYPE_CHECKING:
    from agent.config import AgentConfig, StreamConfig
    from agent.uplink.uplink import Uplink

__all__ = ["FleetManager", "store_for", "stored_card_for"]

log = logging.getLogger(__name__)

WORKER_TICK_S = 0.25
# Chunks waiting for the worker; beyond this they are dropped and counted.
# Nothing is lost for good: chunks are retained, and a stalled transfer
# re-subscribes to fetch what is missing.
INBOX_MAX = 4096
# Distinct manifest topics waiting for the current rollout (one per model name is
# the legitimate case); beyond this a publisher is flooding us.
HELD_MAX = 64


def store_for(cfg: AgentConfig) -> ModelStore:
    return ModelStore(cfg.resolve(cfg.state_dir) / "models")


# A version whose trial the agent died in this many times is refused for good: a
# model that crashes the runtime would otherwise crash-loop the device.
TRIAL_ATTEMPTS_MAX = 2


def recover_interrupted_trial(cfg: AgentConfig) -> dict[str, Any] | None:
    """Before the streams load: undo a model trial the previous run died in.

    A version that was active but not yet through its watch is switched back (a
    model is never left running unwatched); after ``TRIAL_ATTEMPTS_MAX`` deaths
    it is refused for good. Returns the marker (with ``outcome``) to report.
    """
    store = store_for(cfg)
    t = store.bump_trial()
    if t is None:
        return None
    name, version, sha = str(t["name"]), int(t["version"]), str(t["sha256"])
    phase = str(t.get("phase", "canary"))
    active = store.active(name)
    if phase == "watch" and active is not None and active.version == version:
        store.switch_back(name)
        log.error("model %s v%d: the agent stopped during its watch; switched back",
                  name, version)
    if int(t["attempts"]) > TRIAL_ATTEMPTS_MAX:
        v = store.find(name, version, sha)
        if v is not None:
            store.discard(v)
        reason = (f"the agent died {int(t['attempts']) - 1} times during this model's "
                  f"trial ({phase})")
        store.reject(name, sha, version, "crashed", reason)
        store.end_trial()
        log.error("model %s v%d refused: %s", name, version, reason)
        return {**t, "outcome": "rejected", "reason": reason}
    return {**t, "outcome": "retry"}


class UplinkLink:
    """The receiver's ``Link`` over the agent's upstream paho client."""

    def __init__(self, client: mqtt.Client, status_topic: str) -> None:
        self.client = client
        self.status_topic = status_topic

    def subscribe(self, topic_filter: str) -> None:
        self.client.subscribe(topic_filter, qos=1)

    def unsubscribe(self, topic_filter: str) -> None:
        self.client.unsubscribe(topic_filter)

    def publish_status(self, payload: bytes) -> None:
        # State, not an event: retained, and straight to paho rather than the outbox.
        self.client.publish(self.status_topic, payload, qos=1, retain=True)


def _affine(slot: ModelSlot, src: ModelCard, dst: ModelCard
            ) -> Callable[[Windows], Windows] | None:
    """Re-normalise windows from ``src``'s card statistics to ``dst``'s (``normalise: model``)."""
    if slot.normalise != "model" or (np.array_equal(src.mean, dst.mean)
                                       and np.array_equal(src.std, dst.std)):
        return None
    gain = (src.std / dst.std).astype(np.float32)
    shift = ((src.mean - dst.mean) / dst.std).astype(np.float32)

    def convert(w: Windows) -> Windows:
        out: Windows = w * gain + shift
        return out

    return convert


@dataclass
class _StreamSwap:
    slot: ModelSlot
    card: ModelCard
    scorer: Scorer
    trial: Trial | None = None
    old_card: ModelCard | None = None
    old_scorer: Scorer | None = None
    old_calibration: Calibration | None = None


@dataclass
class _Rollout:
    manifest: ModelManifest
    version: StoredVersion
    swaps: list[_StreamSwap]
    phase: str = "canary"  # canary -> watch -> done
    started: float = field(default_factory=time.monotonic)


class FleetManager:
    """Owns the fleet worker thread and one rollout at a time."""

    def __init__(self, cfg: AgentConfig, slots: list[ModelSlot], uplink: Uplink, *,
                 recovered: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.agent_cfg = cfg
        self.slots = slots
        self.recovered = recovered
        self.cfg = cfg.fleet
        self._clock = clock
        self.store = store_for(cfg)
        prefix = cfg.upstream.prefix
        client = uplink.client
        self.link = UplinkLink(client, f"{prefix}/{cfg.device_id}/model/status")
        fc = self.cfg
        self.receiver = ModelReceiver(
            device_id=cfg.device_id, group=fc.group, prefix=prefix,
            trusted={k: public_key_from_b64(v) for k, v in fc.trusted_keys.items()},
            store=self.store,
            limits=ReceiverLimits(fc.max_model_bytes, fc.max_chunk_bytes,
                                  fc.download_timeout_s, fc.resubscribe_after_s),
            link=self.link, fits=self._fits, current=self._current, busy=self._busy,
            on_staged=self._on_staged, active_models=self.active_models, clock=clock,
            formats=self._formats,
        )
        self._inbox: collections.deque[tuple[bool, str, bytes]] = collections.deque()
        self._held: dict[str, bytes] = {}  # manifests that arrived during a rollout
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rollout: _Rollout | None = None
        self.dropped_chunks = 0
        self.dropped_manifests = 0
        self.callback_errors = 0
        self.swaps = 0
        self.rollbacks = 0
        for f in self.receiver.manifest_filters():
            uplink.subscribe(f, 1, self._on_manifest)
        # Chunk topics are subscribed per transfer; this only routes them here.
        client.message_callback_add(f"{prefix}/blobs/+/+", self._on_chunk)

    # -- paho network thread: queue and return, never raise -------------------------

    def _on_manifest(self, msg: mqtt.MQTTMessage) -> None:
        # Bounded before anything is kept: an oversized or flooding publisher costs a
        # counter, not memory (the manifest is refused unread either way).
        if len(msg.payload) > MANIFEST_MAX_BYTES or len(self._inbox) >= INBOX_MAX:
            self.dropped_manifests += 1
            return
        if len(self._held) >= HELD_MAX and msg.topic not in self._held:
            self.dropped_manifests += 1
            return
        self._inbox.append((True, msg.topic, bytes(msg.payload)))
        self._wake.set()

    def _on_chunk(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if len(self._inbox) >= INBOX_MAX:
                self.dropped_chunks += 1
                return
            self._inbox.append((False, msg.topic, bytes(msg.payload)))
            self._wake.set()
        except Exception:
            self.callback_errors += 1
            log.exception("error queueing a model chunk")

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        rec = self.recovered
        if rec is not None and rec.get("outcome") == "rejected":
            # Retained, so the cloud sees why the device refused this version for good.
            self.receiver.report("rejected", rec["name"], rec["version"], code="crashed",
                                 reason=rec["reason"])
        incoming = self.store.root / "incoming"
        for part in incoming.glob("*.part") if incoming.is_dir() else ():
            part.unlink(missing_ok=True)  # a transfer cut short by a restart starts over
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        # A clean stop is not a crash: no attempt is counted. A version still in its
        # watch is switched back, so the next start never runs it unwatched (the
        # retained manifest brings it round again for a full canary and watch).
        r = self.rollout
        if r is not None and r.phase == "watch":
            self.store.switch_back(r.manifest.name)
            log.warning("model %s v%d: stopped during its watch; switched back until it is "
                        "tried again", r.manifest.name, r.manifest.version)
        self.store.end_trial()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(WORKER_TICK_S)
            self._wake.clear()
            try:
                self.step()
            except Exception:
                log.exception("fleet step failed")

    def step(self) -> None:
        """Handle queued messages, time-outs and decided trials (the worker's one step)."""
        while self._inbox:
            is_manifest, topic, payload = self._inbox.popleft()
            if is_manifest and self.rollout is not None:
                self._held[topic] = payload  # one rollout at a time; latest per topic wins
            elif is_manifest:
                self.receiver.handle_manifest(topic, payload)
            else:
                self.receiver.handle_chunk(topic, payload)
        self.receiver.tick()
        self._advance()
        for topic, payload in self.receiver.pop_deferred().items():
            self._held.setdefault(topic, payload)  # a newer one already held wins
        while self._held and self.rollout is None and self.receiver.transfer is None:
            topic = next(iter(self._held))
            self.receiver.handle_manifest(topic, self._held.pop(topic))

    # -- receiver callbacks ------------------------------------------------------------

    def _streams(self, name: str) -> list[ModelSlot]:
        # Only streams scored by a delivered-format model (not model: none streams).
        return [sl for sl in self.slots if sl.card.name == name and sl.is_model]

    def _stream_cfg(self, slot: ModelSlot) -> StreamConfig:
        return next(s for s in self.agent_cfg.streams if s.name == slot.stream)

    def active_models(self) -> dict[str, int]:
        return {sl.card.name: sl.card.version for sl in self.slots}

    def _current(self, name: str) -> tuple[int, str] | None:
        sts = self._streams(name)
        return (sts[0].card.version, sts[0].card.sha256) if sts else None

    def _busy(self, m: ModelManifest) -> bool:
        r = self.rollout
        return r is not None and r.manifest.sha256 == m.sha256

    def _formats(self, m: ModelManifest) -> list[str]:
        """Formats the streams using ``m.name`` run, best first (their backend settings)."""
        from agent.scoring.registry import device_formats  # noqa: PLC0415

        sts = self._streams(m.name)
        return device_formats(self._stream_cfg(sts[0]) if sts else None)

    def _fits(self, m: ModelManifest) -> None:
        sts = self._streams(m.name)
        if not sts:
            raise Refusal("no_stream", f"no stream here uses model {m.name!r}")
        for sl in sts:
            if m.window != sl.window or tuple(m.fields) != sl.fields:
                raise Refusal("input_mismatch",
                              f"{m.name} v{m.version} takes {m.window} x {list(m.fields)}; "
                              f"stream {sl.stream} has {sl.window} x {list(sl.fields)}")

    def _on_staged(self, m: ModelManifest, v: StoredVersion) -> None:
        self.receiver.report("staged", m.name, m.version)
        # From here a crash (even inside the runtime, loading this model) is remembered.
        self.store.begin_trial(m.name, m.version, m.sha256, "canary")
        swaps: list[_StreamSwap] = []
        try:
            for sl in self._streams(m.name):
                card = load_card(v.card_path)
                if card.window != sl.window or tuple(card.fields) != sl.fields:
                    raise Refusal("input_mismatch", f"{m.name} v{m.version}: card does not fit "
                                                    f"stream {sl.stream}")
                # The staging hook: a backend that builds (TensorRT from ONNX) builds here,
                # before the canary, and caches the engine under state_dir for the swap and
                # for restarts.
                scorer = open_scorer(card, self._stream_cfg(sl),
                                     self.agent_cfg.resolve(self.agent_cfg.state_dir))
                # Warm it (first invoke allocates) off the stream's lock.
                probe = np.zeros((1, card.window, len(card.fields)), np.float32)
                scorer.score(probe)
                swaps.append(_StreamSwap(sl, card, scorer))
        except (ModelError, ValueError, RuntimeError) as e:
            code = "input_mismatch" if "does not hold window" in str(e) else "load_failed"
            self._refuse_staged(m, v, Refusal(code, f"{m.name} v{m.version}: {e}"))
            return
        except Refusal as r:
            self._refuse_staged(m, v, r)
            return
        self.rollout = _Rollout(m, v, swaps)
        if self.cfg.canary_windows == 0:
            self._promote(self.rollout)
            return
        policy = self._policy(self.cfg.canary_windows)
        for sw in swaps:
            sw.trial = Trial("canary", sw.scorer, policy,
                             convert=_affine(sw.slot, sw.slot.card, sw.card),
                             on_decided=self._wake.set)
            sw.slot.set_shadow(sw.trial)
        log.info("model %s v%d: canary on %d stream(s) for %d windows", m.name, m.version,
                 len(swaps), self.cfg.canary_windows)
        self.receiver.report("canary", m.name, m.version, canary=[0, self.cfg.canary_windows])

    def _refuse_staged(self, m: ModelManifest, v: StoredVersion, r: Refusal,
                       state: str = "rejected") -> None:
        self.store.end_trial()
        self.store.discard(v)
        self.receiver.refuse(m, r, state=state)

    def _policy(self, windows: int) -> TrialPolicy:
        return TrialPolicy(windows, self.cfg.latency_budget_ms / 1e3,
                           self.cfg.max_alert_rate_increase,
                           max_false_alarms=self.cfg.max_false_alarms,
                           min_agreement=self.cfg.min_agreement)

    # -- canary -> promote -> watch -> done / roll back -------------------------------

    def _advance(self) -> None:
        r = self.rollout
        if r is None:
            return
        if time.monotonic() - r.started > self.cfg.trial_timeout_s:
            # A stream that gets no usable windows (no data, still warming up) must not
            # hold every later model back for ever.
            for sw in r.swaps:
                if sw.trial is not None and sw.trial.result is None:
                    sw.trial.fail(sw.slot, f"undecided after {self.cfg.trial_timeout_s:.0f} s "
                                           f"({sw.trial.windows} usable windows)")
        trials = [sw.trial for sw in r.swaps if sw.trial is not None]
        failed = [t for t in trials if t.result == "failed"]
        if failed:
            if r.phase == "canary":
                self._end_canary(r)
                self.rollout = None
                self._refuse_staged(r.manifest, r.version,
                                    Refusal("canary_failed", f"canary failed: {failed[0].reason}"))
            else:
                self._roll_back(r, failed[0].reason)
            return
        if not all(t.result == "passed" for t in trials):
            return
        if r.phase == "canary":
            log.info("model %s v%d: canary passed (%s)", r.manifest.name, r.manifest.version,
                     trials[0].reason if trials else "no windows")
            self._promote(r)
        else:
            for sw in r.swaps:
                sw.slot.set_shadow(None)
            self.rollout = None
            self.store.end_trial()
            log.info("model %s v%d: watch passed (%s)", r.manifest.name, r.manifest.version,
                     trials[0].reason if trials else "")
            self.receiver.report("active", r.manifest.name, r.manifest.version, watch="passed")

    def _end_canary(self, r: _Rollout) -> None:
        for sw in r.swaps:
            sw.slot.set_shadow(None)

    def _promote(self, r: _Rollout) -> None:
        m = r.manifest
        watch = self.cfg.watch_windows
        if watch:
            self.store.begin_trial(m.name, m.version, m.sha256, "watch")
        else:
            self.store.end_trial()
        self.store.activate(m.name, r.version)
        for sw in r.swaps:
            sl = sw.slot
            canary = sw.trial
            # The canary calibrated the new model on live windows: it goes in with its
            # own threshold, and the live model's is kept for a rollback and the watch.
            new_cal = canary.calibration if canary is not None else None
            sw.old_calibration = canary.live_calibration if canary is not None else None
            watch_trial = None
            if watch:
                # Without a canary (canary_windows: 0) there is no calibration of the old
                # model: the watch then checks scores, latency and crashes only.
                watch_trial = Trial("watch", sl.scorer, self._policy(watch),
                                    reference=sw.old_calibration,
                                    convert=_affine(sl, sw.card, sl.card),
                                    on_decided=self._wake.set,
                                    on_fail_now=self._restore_locked(sw))
            with sl.lock:
                sw.old_card, sw.old_scorer = sl.swap(sw.card, sw.scorer, new_cal)
                sl.shadow = watch_trial
            sw.trial = watch_trial
        self.swaps += 1
        log.info("model %s v%d is active (was v%d)", m.name, m.version,
                 r.swaps[0].old_card.version if r.swaps and r.swaps[0].old_card else -1)
        if watch:
            r.phase = "watch"
            self.receiver.report("active", m.name, m.version, watch=[0, watch])
        else:
            self.rollout = None
            self.receiver.report("active", m.name, m.version)

    @staticmethod
    def _restore_locked(sw: _StreamSwap) -> Callable[[ModelSlot], None]:
        def restore(slot: ModelSlot) -> None:
            # Called by the watch trial under st.lock: put the old model back now,
            # before another window reaches the broken one.
            _restore(sw)

        return restore

    def _roll_back(self, r: _Rollout, reason: str) -> None:
        m = r.manifest
        for sw in r.swaps:
            with sw.slot.lock:
                _restore(sw)
        self.store.switch_back(m.name)  # to the configured model when there is no previous
        self.rollout = None
        self.store.end_trial()
        self.rollbacks += 1
        log.error("model %s v%d rolled back to v%s: %s", m.name, m.version,
                  r.swaps[0].old_card.version if r.swaps and r.swaps[0].old_card else "?",
                  reason)
        self.store.discard(r.version)
        self.receiver.refuse(m, Refusal("watch_failed", f"watch failed: {reason}"),
                             state="rolled_back")

    def stats(self) -> dict[str, Any]:
        r = self.rollout
        return {
            "rollout": None if r is None else {"model": r.manifest.name,
                                               "version": r.manifest.version,
                                               "phase": r.phase},
            "swaps": self.swaps, "rollbacks": self.rollbacks,
            "refusals": self.receiver.refusals, "dropped_chunks": self.dropped_chunks,
            "dropped_manifests": self.dropped_manifests + self.receiver.dropped_manifests,
        }


def _restore(sw: _StreamSwap) -> None:
    """Put a stream's previous model back; the caller holds ``sw.slot.lock``."""
    if sw.old_scorer is None or sw.old_card is None:
        return
    sw.slot.swap(sw.old_card, sw.old_scorer, sw.old_calibration)
    sw.slot.shadow = None


def stored_card_for(cfg: AgentConfig, configured: ModelCard) -> ModelCard:
    """The store's active version of a configured model, when fleet delivery is on."""
    if not cfg.fleet.enabled:
        return configured
    card = store_for(cfg).load_active(configured.name)
    if card is None:
        return configured
    log.info("model %s: using delivered v%d from %s (configured v%d)", card.name, card.version,
             Path(card.path).parent.name, configured.version)
    return card
