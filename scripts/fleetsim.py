"""A fleet in one process: many simulated devices receive one push through one broker.

Each simulated device is its own MQTT connection (its own paho client, client
id and session) and runs the real device code: ``ModelReceiver`` (manifest
parsing, Ed25519 verification, policy checks, chunk assembly into a ``.part``
file, sha256 check), a real ``ModelStore`` (staging, fsync, atomic switch) and,
unless ``load=False``, a real LiteRT load of the received model. What it does
not have is a sensor stream: there is no canary, a verified model is
activated at once. All clients are driven by one selector loop on one thread
(paho's external-loop API), so 200 devices cost 200 sockets, not 200 threads.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.manager import UplinkLink
from agent.fleet.manifest import ModelManifest, Refusal, public_key_from_b64
from agent.fleet.receiver import ModelReceiver, ReceiverLimits
from agent.fleet.store import ModelStore, StoredVersion
from agent.scoring import ModelCard, load_card
from agent.scoring.registry import SCORERS

__all__ = ["SimDevice", "SimFleet", "SysStats", "summarise"]

log = logging.getLogger(__name__)


@dataclass
class SimDevice:
    device_id: str
    client: mqtt.Client
    receiver: ModelReceiver
    card: ModelCard
    subscribed: bool = False
    messages: int = 0
    payload_bytes: int = 0
    state: str = "idle"
    errors: int = 0
    activated_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _SimStream:
    """The one stream setting a backend needs to load a model: its batch size."""

    def __init__(self, batch: int) -> None:
        self.batch = batch


class SimFleet:
    """``n`` simulated devices of one group, each with its own store under ``root``."""

    def __init__(self, n: int, *, host: str, port: int, root: Path, trusted: dict[str, str],
                 base_card: ModelCard, group: str = "default", prefix: str = "edge",
                 load: bool = True, clock: Callable[[], float] = time.time) -> None:
        self.host, self.port = host, port
        self.load = load
        self._clock = clock
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        keys = {k: public_key_from_b64(v) for k, v in trusted.items()}
        limits = ReceiverLimits(8 * 1024 * 1024, 256 * 1024, 600.0, 15.0)
        self.devices: list[SimDevice] = []
        run = uuid.uuid4().hex[:6]
        for i in range(n):
            dev_id = f"sim-{i:04d}"
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{dev_id}-{run}",
                                 protocol=mqtt.MQTTv311, clean_session=True)
            store = ModelStore(root / dev_id / "models", clock=clock)
            link = UplinkLink(client, f"{prefix}/{dev_id}/model/status")
            dev = SimDevice(dev_id, client, None, base_card)  # type: ignore[arg-type]
            dev.receiver = ModelReceiver(
                device_id=dev_id, group=group, prefix=prefix, trusted=keys, store=store,
                limits=limits, link=link, fits=self._fits(dev), current=self._current(dev),
                busy=lambda m: False, on_staged=self._on_staged(dev),
                active_models=self._active(dev), clock=clock,
            )
            client.on_connect = self._on_connect(dev)
            client.on_subscribe = self._on_subscribe(dev)
            client.on_message = self._on_message(dev)
            self.devices.append(dev)

    # -- device behaviour (callbacks on the loop thread: never raise) -----------------

    @staticmethod
    def _current(dev: SimDevice) -> Callable[[str], tuple[int, str] | None]:
        def current(name: str) -> tuple[int, str] | None:
            return (dev.card.version, dev.card.sha256) if name == dev.card.name else None

        return current

    @staticmethod
    def _active(dev: SimDevice) -> Callable[[], dict[str, int]]:
        return lambda: {dev.card.name: dev.card.version}

    @staticmethod
    def _fits(dev: SimDevice) -> Callable[[ModelManifest], None]:
        def fits(m: ModelManifest) -> None:
            if m.name != dev.card.name:
                raise Refusal("no_stream", f"no stream here uses model {m.name!r}")
            if m.window != dev.card.window or m.fields != dev.card.fields:
                raise Refusal("input_mismatch", f"{m.name} v{m.version} does not fit the stream")

        return fits

    def _on_staged(self, dev: SimDevice) -> Callable[[ModelManifest, StoredVersion], None]:
        def on_staged(m: ModelManifest, v: StoredVersion) -> None:
            try:
                card = load_card(v.card_path)
                if self.load:
                    scorer = SCORERS[card.format].make(card, _SimStream(1))
                    scorer.score(np.zeros((1, card.window, len(card.fields)), np.float32))
            except Exception as e:  # whatever a broken model raises, refuse it
                dev.receiver.store.discard(v)
                dev.receiver.refuse(m, Refusal("load_failed", f"{m.name} v{m.version}: {e}"))
                dev.state = "rejected"
                return
            dev.receiver.store.activate(m.name, v)
            dev.card = card
            dev.state = "active"
            dev.activated_at = self._clock()
            dev.receiver.report("active", m.name, m.version)

        return on_staged

    def _on_connect(self, dev: SimDevice) -> Callable[..., None]:
        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
            try:
                client.subscribe([(f, 1) for f in dev.receiver.manifest_filters()])
            except Exception:
                dev.errors += 1

        return on_connect

    @staticmethod
    def _on_subscribe(dev: SimDevice) -> Callable[..., None]:
        def on_subscribe(*args: Any) -> None:
            dev.subscribed = True

        return on_subscribe

    @staticmethod
    def _on_message(dev: SimDevice) -> Callable[..., None]:
        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                dev.messages += 1
                dev.payload_bytes += len(msg.payload)
                r = dev.receiver
                payload = bytes(msg.payload)
                if msg.topic.startswith(r.blob_prefix):
                    r.handle_chunk(msg.topic, payload)
                else:
                    r.handle_manifest(msg.topic, payload)
                    if r.transfer is not None:
                        dev.state = "downloading"
                if dev.state == "downloading" and r.transfer is None and dev.activated_at is None:
                    dev.state = "rejected"
            except Exception:
                dev.errors += 1
                log.exception("simulated device %s failed on %s", dev.device_id, msg.topic)

        return on_message

    # -- the event loop ----------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> float:
        """Connect every device and wait for its SUBACK; return the seconds it took."""
        t0 = time.monotonic()
        for dev in self.devices:
            dev.client.connect(self.host, self.port, keepalive=60)
            sock = dev.client.socket()
            assert sock is not None
            self._sel.register(sock, selectors.EVENT_READ, dev)
        self._thread = threading.Thread(target=self._loop, name="fleet-sim", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not all(d.subscribed for d in self.devices):
            if time.monotonic() > deadline:
                raise TimeoutError("not every simulated device subscribed in time")
            time.sleep(0.01)
        return time.monotonic() - t0

    def _loop(self) -> None:
        last_misc = 0.0
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.05):
                dev: SimDevice = key.data
                dev.client.loop_read()
            for dev in self.devices:
                if dev.client.want_write():
                    dev.client.loop_write()
            now = time.monotonic()
            if now - last_misc >= 1.0:
                last_misc = now
                for dev in self.devices:
                    dev.client.loop_misc()
                    dev.receiver.tick()

    def wait(self, pred: Callable[[SimDevice], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(pred(d) for d in self.devices):
                return True
            time.sleep(0.005)
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for dev in self.devices:
            try:
                dev.client.disconnect()
                dev.client.loop_write()
            except (OSError, ValueError):
                pass
            sock = dev.client.socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
                sock.close()
        self._sel.close()


class SysStats:
    """mosquitto's cumulative $SYS counters (needs ``sys_interval`` set on the broker)."""

    TOPICS = ("$SYS/broker/bytes/sent", "$SYS/broker/bytes/received",
              "$SYS/broker/messages/sent", "$SYS/broker/messages/received")

    def __init__(self, host: str, port: int) -> None:
        self.values: dict[str, int] = {}
        self.updates = 0
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"sys-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe([(t, 0) for t in self.TOPICS])
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            with self._cond:
                self.values[msg.topic.rsplit("/", 2)[-2] + "_" + msg.topic.rsplit("/", 1)[-1]] = \
                    int(msg.payload)
                self.updates += 1
                self._cond.notify_all()
        except ValueError:
            pass

    def fresh(self, timeout: float = 15.0) -> dict[str, int]:
        """Counters from an update published after this call (all four topics)."""
        with self._cond:
            start = self.updates
            self._cond.wait_for(lambda: self.updates >= start + len(self.TOPICS), timeout)
            return dict(self.values)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def summarise(fleet: SimFleet, t_push: float, sys_before: dict[str, int],
              sys_after: dict[str, int]) -> dict[str, Any]:
    """Figures of one simulated rollout, as JSON-able numbers."""
    done = [d.activated_at - t_push for d in fleet.devices if d.activated_at is not None]
    delta = {k: sys_after.get(k, 0) - sys_before.get(k, 0) for k in sys_after}
    return {
        "devices": len(fleet.devices),
        "active": len(done),
        "rollout_s_p50": round(float(np.percentile(done, 50)), 3) if done else None,
        "rollout_s_max": round(max(done), 3) if done else None,
        "device_messages": sum(d.messages for d in fleet.devices),
        "device_payload_bytes": sum(d.payload_bytes for d in fleet.devices),
        "errors": sum(d.errors for d in fleet.devices),
        "broker": delta,
    }
