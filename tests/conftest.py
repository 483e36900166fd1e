"""Shared fixtures: a real mosquitto on a free port, configs, a cloud-side subscriber."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml

from agent.broker import LocalBroker
from agent.scoring import find_model, load_card

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# Development tooling that is not part of the runtime package (the fleet simulator,
# the evaluation library) lives under scripts/.
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))
SKAB_FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
               "Thermocouple", "Voltage", "Volume Flow RateRMS"]



def wait_until(pred: Callable[[], Any], timeout: float, step: float = 0.05) -> bool:
    """Poll a condition on another process's or thread's state (no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())

@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A mosquitto started from tests/mosquitto.conf on a free port; waits until it accepts."""
    b = LocalBroker((TESTS / "mosquitto.conf").read_text(), workdir=tmp_path / "broker")
    b.start()
    yield b
    b.close()


@pytest.fixture(scope="session")
def card():
    return load_card(find_model("skab-ae", REPO))


def normal_rows(card, n: int, seed: int = 0, t0: float = 1_700_000_000.0) -> list[dict[str, Any]]:
    """Readings that look like the model's training data (mean +- a fraction of std)."""
    rng = np.random.default_rng(seed)
    vals = card.mean + card.std * 0.3 * rng.standard_normal((n, len(card.mean)))
    return [{"ts": t0 + i, **dict(zip(SKAB_FIELDS, map(float, v), strict=True))}
            for i, v in enumerate(vals)]


def anomalous_rows(card, n: int, t0: float) -> list[dict[str, Any]]:
    vals = card.mean + card.std * 25.0
    return [{"ts": t0 + i, **dict(zip(SKAB_FIELDS, map(float, vals), strict=True))}
            for i in range(n)]


def agent_config(tmp_path: Path, port: int, **stream_overrides: Any) -> dict[str, Any]:
    stream = {
        "name": "pump", "topic": "sensors/pump/+", "format": "json", "fields": SKAB_FIELDS,
        "window": 16, "hop": 4, "model": "skab-ae", "warmup": 64,
        "alert": {"threshold": "auto", "quantile": 0.99, "margin": 2.0, "cooldown_s": 0},
    }
    stream.update(stream_overrides)
    return {
        "device_id": "dev1",
        "state_dir": str(tmp_path / "state"),
        "local": {"host": "127.0.0.1", "port": port},
        "upstream": {"host": "127.0.0.1", "port": port, "status_interval_s": 1},
        "streams": [stream],
    }


def write_config(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


class Cloud:
    """A subscriber on the upstream topics that records every message."""

    def __init__(self, port: int, topic: str = "edge/#") -> None:
        self.messages: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-{id(self)}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(5), "cloud subscriber did not get SUBACK"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = msg.payload
        with self._cond:
            self.messages.append((msg.topic, body))
            self._cond.notify_all()

    def of(self, kind: str) -> list[Any]:
        with self._cond:
            return [b for t, b in self.messages if f"/{kind}" in t]

    def wait_for(self, pred: Callable[[Cloud], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def cloud(broker: LocalBroker) -> Iterator[Cloud]:
    c = Cloud(broker.port)
    yield c
    c.close()


def publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sensor-{time.monotonic_ns()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish_all(client: mqtt.Client, topic: str, rows: list[Any], qos: int = 1) -> None:
    infos = [client.publish(topic, r if isinstance(r, bytes | str) else json.dumps(r), qos=qos)
             for r in rows]
    for i in infos:
        i.wait_for_publish(timeout=10)


class AgentProcess:
    """``edge-agent run`` as a subprocess, stopped as systemd would (SIGTERM)."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.log = config.parent / f"agent-{time.monotonic_ns()}.log"
        self._log_f = self.log.open("wb")
        exe = Path(sys.executable).parent / "edge-agent"
        self.proc = subprocess.Popen([str(exe), "run", "--config", str(config)],
                                     stdout=self._log_f, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                return text in self.output()
            time.sleep(0.05)
        return False

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(timeout=timeout)
        self._log_f.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log_f.close()
