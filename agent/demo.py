"""``edge-agent demo``: the whole job on an embedded default, watched live.

Starts a throw-away mosquitto, replays a SKAB pump recording (or a built-in
generator when the data is not there) as sensor messages, runs the agent
against it with a cloud subscriber on the same broker, prints what happens, and
serves the live page (the same one ``service.health`` serves) while it runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import webbrowser
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import BrokerError, LocalBroker
from agent.config import parse_config
from agent.daemon import Agent
from agent.pipeline import Episode, Event, ScoreBatch, StreamPipeline
from agent.scoring.registry import open_stream_model
from agent.service.health import HealthServer, check_pipeline, metrics_registry
from agent.service.live import LiveView

__all__ = ["find_skab_file", "generate", "run_demo"]

SKAB_FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
               "Thermocouple", "Voltage", "Volume Flow RateRMS"]
DEMO_FILE = "valve1/5.csv"  # a recording with one valve fault, from 577 s to 980 s
DEVICE = "demo-pump"


def find_skab_file() -> Path | None:
    """The SKAB recording under $EDGE_AGENT_DATA (a folder holding skab/), if set."""
    root = os.environ.get("EDGE_AGENT_DATA")
    if root and (Path(root) / "skab" / DEMO_FILE).is_file():
        return Path(root) / "skab" / DEMO_FILE
    return None


def read_skab(path: Path) -> Iterator[tuple[float, list[float], int]]:
    """Rows of a SKAB-style CSV: (epoch seconds, 8 values, anomaly label or -1)."""
    with path.open(newline="") as f:
        for row in csv.DictReader(f, delimiter=";"):
            ts = datetime.fromisoformat(row["datetime"]).timestamp()
            label = int(float(row["anomaly"])) if row.get("anomaly") not in (None, "") else -1
            yield ts, [float(row[k]) for k in SKAB_FIELDS], label


def generate(n: int, mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32],
             seed: int = 7) -> Iterator[tuple[float, list[float], int]]:
    """A pump-like 8-channel signal with a fault injected in the last third."""
    rng = np.random.default_rng(seed)
    t0 = time.time() - n
    phase = rng.uniform(0, 2 * math.pi, size=len(mean))
    start, end = int(n * 0.65), int(n * 0.8)
    for i in range(n):
        v = mean + std * (0.3 * np.sin(2 * math.pi * i / 60 + phase)
                          + 0.2 * rng.standard_normal(len(mean)))
        label = int(start <= i < end)
        if label:
            v = v + std * np.array([3, 3, 2, -2, 0, 0, 0, -3], dtype=np.float32)
        yield t0 + i, [float(x) for x in v], label


# The generator's operating point: a SKAB pump's channel levels and their spread.
PUMP_LEVEL = np.array([0.027, 0.039, 1.2, 0.055, 75.0, 25.9, 230.0, 32.0], np.float32)
PUMP_SPREAD = np.array([0.0004, 0.001, 0.35, 0.2, 0.1, 0.01, 10.0, 0.4], np.float32)
# The demo's stream: the shipped example's pump stream (config/agent.example.yaml), i.e.
# what a user runs.
WINDOW, HOP = 16, 4


class _Cloud:
    """A subscriber on the upstream topics, as the cloud would see them."""

    def __init__(self, port: int) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.status: dict[str, Any] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-cloud")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edge/{DEVICE}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if "/alert/" in msg.topic and body.get("event") == "resolved":
            print(f"  cloud <- {msg.topic}  seq={body['seq']} resolved episode "
                  f"{body['episode']} ({body['duration_s']:.0f} s)", flush=True)
        elif "/alert/" in msg.topic:
            self.alerts.append(body)
            print(f"  cloud <- {msg.topic}  seq={body['seq']} episode {body['episode']} "
                  f"score={body['score']:.3f}", flush=True)
        elif msg.topic.endswith("/status"):
            self.status = body

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _page(agent: Agent, port: int) -> HealthServer:
    """The live page on loopback: ``port`` if free, else any free one."""
    live = LiveView(agent, agent.cfg.service.live)

    def health() -> Any:
        return check_pipeline(agent, agent.cfg.service.stall_after_s)

    try:
        return HealthServer("127.0.0.1", port, health, metrics_registry(agent, health), live=live)
    except OSError:
        return HealthServer("127.0.0.1", 0, health, metrics_registry(agent, health), live=live)


def run_demo(speed: float = 200.0, source: str = "auto", limit: int = 0, *,
             page: bool = True, browser: bool = True, port: int = 8765) -> int:
    """Run the demo; return the process exit code.

    ``page`` serves the live page while the replay runs (and, on a terminal, until
    Ctrl-C); ``browser`` also opens it.
    """
    path: Path | None = None
    if source == "auto":
        path = find_skab_file()
    elif source != "generator":
        path = Path(source)
    if path is not None:
        rows: Iterator[tuple[float, list[float], int]] = read_skab(path)
        total = sum(1 for _ in path.open()) - 1
        origin = f"SKAB recording {path}"
    else:
        total = 1200
        rows = generate(total, PUMP_LEVEL, PUMP_SPREAD)
        origin = "built-in generator (set EDGE_AGENT_DATA to a folder with skab/ to replay SKAB)"
    if limit:
        total = min(total, limit)

    try:
        broker = LocalBroker().start()
    except BrokerError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    state = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    cfg = parse_config({
        "device_id": DEVICE,
        "state_dir": str(state),
        "local": {"host": "127.0.0.1", "port": broker.port},
        "upstream": {"host": "127.0.0.1", "port": broker.port, "status_interval_s": 2},
        "streams": [{
            "name": "pump", "topic": "sensors/pump", "format": "json", "fields": SKAB_FIELDS,
            "window": WINDOW, "hop": HOP, "model": "none", "warmup": 400,
            # The two settings the example's pump stream changes from the schema.
            "alert": {"margin": 1.3}, "adapt": {"input_halflife": 0},
        }],
    })
    card, _ = open_stream_model(cfg, cfg.streams[0])
    scored = [0]
    last_print = [0.0]

    def observe(st: StreamPipeline, events: list[Event]) -> None:
        now = time.monotonic()
        for e in events:
            if isinstance(e, ScoreBatch):
                scored[0] += len(e.raw)
            elif isinstance(e, Episode) and e.kind == "alert":
                print(f"  ALERT  {st.cfg.name}: episode {e.episode} opened, score "
                      f"{e.score:.3f} > threshold {e.threshold:.3f}  (window ending "
                      f"{datetime.fromtimestamp(e.ts):%H:%M:%S})", flush=True)
            elif isinstance(e, Episode):
                print(f"  RESOLVED  {st.cfg.name}: episode {e.episode} closed after "
                      f"{e.duration_s or 0:.0f} s (peak {e.score:.3f})", flush=True)
        if now - last_print[0] >= 1.0 and st.last_score is not None:
            last_print[0] = now
            thr = st.threshold
            phase = "warm-up" if thr is None else f"threshold {thr:.3f}"
            print(f"  {st.samples:6d} samples  {st.windows_scored:6d} windows scored  "
                  f"last score {st.last_score:7.3f}  {phase}", flush=True)

    print(f"edge-agent demo: {origin}, {total} samples at {speed:g}/s")
    print(f"  broker 127.0.0.1:{broker.port}, detector {card.name} (window {WINDOW}, hop "
          f"{HOP}, {len(card.fields)} channels; the first 400 samples are its warm-up)")
    agent = Agent(cfg, observer=observe)
    server = _page(agent, port) if page else None
    cloud = _Cloud(broker.port)
    stop = threading.Event()
    prev = signal.signal(signal.SIGINT, lambda *_: stop.set())
    labels: list[tuple[float, int]] = []
    try:
        agent.start()
        if server is not None:
            server.start()
            url = f"http://127.0.0.1:{server.port}/"
            print(f"  live page: {url}", flush=True)
            if browser and not webbrowser.open(url):
                print("  (no browser found here: open the URL yourself)", flush=True)
        if not agent.wait_connected(10):
            print("demo: agent did not connect to the broker", file=sys.stderr)
            return 1
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-sensors")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        t_start = time.monotonic()
        for i, (ts, values, label) in enumerate(rows):
            if stop.is_set() or (limit and i >= limit):
                break
            body = {"ts": ts, **dict(zip(SKAB_FIELDS, values, strict=True))}
            pub.publish("sensors/pump", json.dumps(body))
            labels.append((ts, label))
            delay = t_start + (i + 1) / speed - time.monotonic()
            if delay > 0:
                stop.wait(delay)
        pub.loop_stop()
        pub.disconnect()
        # Let the last windows be scored and their alerts delivered.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (scored[0] < max(0, (len(labels) - WINDOW) // HOP)
                                               or len(agent.outbox)):
            time.sleep(0.1)
        if server is not None and sys.stdin.isatty() and not stop.is_set():
            print(f"  replay done; the page stays up at http://127.0.0.1:{server.port}/ "
                  "- Ctrl-C to quit", flush=True)
            stop.wait()
    finally:
        signal.signal(signal.SIGINT, prev)
        st = agent.streams[0]
        if server is not None:
            server.stop()
        agent.stop()
        time.sleep(0.2)
        cloud.close()
        broker.close()
    _report(st, cloud, labels)
    return 0


def _report(st: StreamPipeline, cloud: _Cloud, labels: list[tuple[float, int]]) -> None:
    print("\nsummary")
    print(f"  samples {st.samples}, windows scored {st.windows_scored}, "
          f"alerts raised {st.alerts}, alerts received by the cloud {len(cloud.alerts)}")
    anomalous = [ts for ts, lab in labels if lab == 1]
    if anomalous and cloud.alerts:
        inside = sum(1 for a in cloud.alerts if any(abs(a["ts"] - t) < 1 for t in anomalous))
        print(f"  {inside} of {len(cloud.alerts)} alerts fall inside labelled anomalies")
    elif anomalous:
        print("  the recording has labelled anomalies but no alert was raised")
