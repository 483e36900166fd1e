"""Helpers for the fleet tests: keys, model variants, releases, a status watcher."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.config import parse_config
from agent.daemon import Agent
from agent.fleet.manifest import generate_key
from agent.fleet.operator import Broker, push_release, sign_release
from agent.scoring import builtin_models_dir

from .conftest import REPO, agent_config

FLEET_DATA = REPO / "tests" / "data" / "fleet"
SHIPPED = builtin_models_dir() / "skab-ae"
# The converter's description string inside the shipped .tflite: same-length
# replacements give byte-different files with identical weights.
DESCRIPTION = b"MLIR Converted."


def make_key(tmp_path: Path, name: str = "ops") -> tuple[Path, str]:
    """(private key file, base64 public key)."""
    pem, pub = generate_key()
    path = tmp_path / f"{name}.pem"
    path.write_bytes(pem)
    return path, pub


def shipped_variant(tag: str) -> bytes:
    """The shipped int8 model with a different description: same behaviour, new sha256."""
    data = (SHIPPED / "model.tflite").read_bytes()
    new = tag.encode()[:len(DESCRIPTION)].ljust(len(DESCRIPTION), b" ")
    assert data.count(DESCRIPTION) == 1
    return data.replace(DESCRIPTION, new)


def model_dir(tmp_path: Path, data: bytes, dirname: str = "variant",
              **card_patch: Any) -> Path:
    """A model directory: the shipped card, pointed at ``data``, with ``card_patch`` applied."""
    d = tmp_path / dirname
    d.mkdir(parents=True, exist_ok=True)
    card = json.loads((SHIPPED / "model.json").read_text())
    card.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data), file="model.tflite")
    for k, v in card_patch.items():
        if isinstance(v, dict) and isinstance(card.get(k), dict):
            card[k] = {**card[k], **v}
        else:
            card[k] = v
    (d / "model.tflite").write_bytes(data)
    (d / "model.json").write_text(json.dumps(card))
    return d


def release(tmp_path: Path, key: Path, version: int, data: bytes | None = None, *,
            key_id: str = "ops", label: str | None = None, expires_in_s: float = 3600,
            chunk_size: int = 4096, rollback: bool = False, **card_patch: Any) -> Path:
    """A signed release directory of ``data`` (default: a variant of the shipped model)."""
    data = shipped_variant(f"v{version}") if data is None else data
    label = label or f"rel-v{version}-{hashlib.sha256(data).hexdigest()[:6]}"
    src = model_dir(tmp_path / "src", data, label, **card_patch)
    out = tmp_path / "releases" / label
    sign_release(src, key, version=version, out=out, key_id=key_id, expires_in_s=expires_in_s,
                 chunk_size=chunk_size, rollback=rollback)
    return out


def push(rel: Path, port: int, **kw: Any) -> None:
    kw.setdefault("group", "default")
    push_release(rel, Broker("127.0.0.1", port), **kw)


def fleet_config(tmp_path: Path, port: int, pub: str, **fleet: Any) -> dict[str, Any]:
    cfg = agent_config(tmp_path, port)
    cfg["fleet"] = {"enabled": True, "trusted_keys": {"ops": pub}, "canary_windows": 8,
                    "watch_windows": 8, **fleet}
    return cfg


class StatusWatcher:
    """Records every message on the devices' retained model status topics."""

    def __init__(self, port: int, topic: str = "edge/+/model/status") -> None:
        self.statuses: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"watcher-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        with self._cond:
            self.statuses.append(json.loads(msg.payload))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool],
                 timeout: float = 20.0) -> dict[str, Any]:
        """The first status (old or new) matching ``pred``; AssertionError on time-out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for s in self.statuses:
                    if pred(s):
                        return s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching model status; got {self.statuses}")
                self._cond.wait(left)

    def state(self, state: str, version: int | None = None, timeout: float = 20.0,
              **fields: Any) -> dict[str, Any]:
        return self.wait_for(lambda s: s.get("state") == state
                             and (version is None or s.get("version") == version)
                             and all(s.get(k) == v for k, v in fields.items()), timeout)

    def states(self) -> list[str]:
        with self._cond:
            return [s["state"] for s in self.statuses]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def copy_shipped(tmp_path: Path) -> Path:
    dst = tmp_path / "shipped-copy"
    shutil.copytree(SHIPPED, dst)
    return dst


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    return make_key(tmp_path)


@pytest.fixture
def watcher(broker: Any) -> Any:
    w = StatusWatcher(broker.port)
    yield w
    w.close()


@pytest.fixture
def start_agent(tmp_path: Path, broker: Any) -> Any:
    """Start an in-process Agent with fleet delivery on: ``start_agent(pub=..., **fleet)``."""
    agents: list[Agent] = []

    def start(**fleet: Any) -> Agent:
        cfg = parse_config(fleet_config(tmp_path, broker.port, fleet.pop("pub"), **fleet),
                           base_dir=tmp_path)
        a = Agent(cfg)
        a.start()
        assert a.wait_connected(10)
        agents.append(a)
        return a

    yield start
    for a in agents:
        a.stop(0)
