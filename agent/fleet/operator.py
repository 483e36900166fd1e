"""The operator's side: sign a model into a release, push it, read the fleet's status."""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.manifest import (
    ModelManifest,
    Refusal,
    build_manifest,
    load_private_key,
    parse_manifest,
)
from agent.scoring import find_model, load_card

__all__ = ["Broker", "PushResult", "collect_status", "load_release", "push_release",
           "sign_release"]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 16 * 1024
MANIFEST_FILE = "manifest.json"


def sign_release(
    model: Path,
    key_file: Path,
    *,
    version: int,
    out: Path,
    key_id: str | None = None,
    expires_in_s: float = 30 * 86400,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    rollback: bool = False,
    clock: Callable[[], float] = time.time,
) -> Path:
    """Write ``out/manifest.json`` + the model file: a release ready for ``push_release``."""
    card_path = find_model(str(model), Path.cwd())
    card = load_card(card_path)  # refuses a card that does not match its file
    data = card.path.read_bytes()
    now = clock()
    present = {f.path.name for f in card.variants}  # variants whose file is here and checked
    raw = {**card.raw, "variants": [v for v in card.raw.get("variants") or []
                                    if v.get("file") in present]}
    doc = build_manifest(raw, data, sha256=card.sha256, version=version,
                         chunk_size=chunk_size, created=now, expires=now + expires_in_s,
                         key_id=key_id or key_file.stem, key=load_private_key(key_file),
                         rollback=rollback)
    out.mkdir(parents=True, exist_ok=True)
    (out / card.path.name).write_bytes(data)
    for v in doc.get("variants", []):  # other formats of the model: checked by load_card
        (out / v["file"]).write_bytes((card.path.parent / v["file"]).read_bytes())
    (out / MANIFEST_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return out / MANIFEST_FILE


def load_release(path: Path) -> tuple[ModelManifest, bytes]:
    """A release directory (or its manifest.json): the manifest and the file it signs."""
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    m = parse_manifest(manifest_path.read_bytes())
    model_path = manifest_path.parent / m.file
    data = model_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != m.size or digest != m.sha256:
        raise Refusal("hash_mismatch", f"{model_path}: "
                                       f"{len(data)} bytes, sha256 {digest[:12]}...; the "
                                       f"manifest says {m.size} bytes, {m.sha256[:12]}...")
    return m, data


@dataclass(frozen=True)
class Broker:
    host: str = "localhost"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    def client(self, role: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2,
                        client_id=f"edge-agent-fleet-{role}-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.ca_file is not None:
            c.tls_set(ca_certs=self.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        return c

    def connect(self, role: str, timeout: float = 10.0) -> mqtt.Client:
        c = self.client(role)
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set()
        c.connect(self.host, self.port)
        c.loop_start()
        if not connected.wait(timeout):
            c.loop_stop()
            raise ConnectionError(f"no CONNACK from {self.host}:{self.port} in {timeout:g} s")
        return c


def close(client: mqtt.Client, timeout: float = 5.0) -> None:
    """Disconnect and stop the loop (stopping it first makes paho log a spurious error)."""
    done = threading.Event()
    client.on_disconnect = lambda *a: done.set()
    if client.disconnect() == mqtt.MQTT_ERR_SUCCESS:
        done.wait(timeout)
    client.loop_stop()


@dataclass(frozen=True)
class PushResult:
    topic: str
    messages: int
    payload_bytes: int
    seconds: float


def target_topic(prefix: str, name: str, group: str | None, device: str | None) -> str:
    if (group is None) == (device is None):
        raise ValueError("push to exactly one of a group or a device")
    return (f"{prefix}/fleet/{group}/model/{name}" if group is not None
            else f"{prefix}/{device}/model/{name}")


def push_release(
    release: Path,
    broker: Broker,
    *,
    prefix: str = "edge",
    group: str | None = None,
    device: str | None = None,
    clear: bool = False,
    timeout: float = 60.0,
) -> PushResult:
    """Publish the chunks, then the manifest, all retained QoS 1; wait for every PUBACK.

    Chunks go first so a device that sees the manifest finds them all. They are
    retained so a device that joins late or reconnects mid-transfer fetches the
    rest by subscribing again. ``clear`` deletes them (empty retained messages).
    """
    m, data = load_release(release)
    blobs = [(m, data)]
    for fmt in m.formats()[1:]:  # the release's other formats: each device fetches one
        v = m.select(fmt)
        vdata = ((release if release.is_dir() else release.parent) / v.file).read_bytes()
        if hashlib.sha256(vdata).hexdigest() != v.sha256 or len(vdata) != v.size:
            raise Refusal("hash_mismatch", f"{v.file}: does not match the manifest")
        blobs.append((v, vdata))
    topic = target_topic(prefix, m.name, group, device)
    manifest_bytes = (release / MANIFEST_FILE if release.is_dir() else release).read_bytes()
    t0 = time.monotonic()
    client = broker.connect("push")
    try:
        infos = []
        for bm, blob in blobs:
            for i in range(bm.chunks):
                chunk = b"" if clear else blob[i * bm.chunk_size:(i + 1) * bm.chunk_size]
                infos.append(client.publish(f"{prefix}/blobs/{bm.sha256}/{i}", chunk, qos=1,
                                            retain=True))
        infos.append(client.publish(topic, b"" if clear else manifest_bytes, qos=1, retain=True))
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(f"broker did not acknowledge the push within {timeout:g} s")
    finally:
        close(client)
    size = 0 if clear else sum(len(b) for _, b in blobs) + len(manifest_bytes)
    return PushResult(topic, sum(bm.chunks for bm, _ in blobs) + 1, size,
                      time.monotonic() - t0)


def collect_status(broker: Broker, *, prefix: str = "edge", group: str | None = None,
                   wait_s: float = 2.0) -> list[dict[str, Any]]:
    """The retained model status of every device (of ``group``), newest per device."""
    got: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict) and (group is None or body.get("group") == group):
            with lock:
                got[str(body.get("device"))] = body

    client = broker.client("status")
    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe(f"{prefix}/+/model/status", qos=1)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        # Retained messages arrive right after the SUBACK; then give stragglers wait_s.
        subscribed.wait(10)
        time.sleep(wait_s)
    finally:
        close(client)
    with lock:
        return [got[d] for d in sorted(got)]
