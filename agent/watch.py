"""``edge-agent watch``: the live view in a terminal, from /events or from the upstream topics.

Per stream: the state, the counters, and a sparkline of the calibrated score
against the threshold (0.5 on that scale; red above it).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

__all__ = ["WatchModel", "read_mqtt", "read_sse", "render", "sparkline"]

log = logging.getLogger(__name__)

BLOCKS = " ▁▂▃▄▅▆▇█"
SPARK_POINTS = 48
STATE_STYLE = {"warming_up": ("warming up", "yellow"), "normal": ("normal", "green"),
               "anomaly": ("ANOMALY", "bold white on red")}


def sparkline(scores: list[float], width: int = SPARK_POINTS) -> Text:
    """Block characters for scores in [0, 1]; those above the threshold (0.5) in red."""
    out = Text()
    for score in scores[-width:]:
        v = min(1.0, max(0.0, score))
        out.append(BLOCKS[round(v * (len(BLOCKS) - 1))], style="red" if v > 0.5 else "green")
    return out


@dataclass
class _Stream:
    status: dict[str, Any] = field(default_factory=dict)
    scores: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=SPARK_POINTS))


class WatchModel:
    """What the view shows, fed by either source; thread-safe."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.agent: dict[str, Any] = {}
        self.streams: dict[str, _Stream] = {}
        self.connected = False
        self.snapshots = 0
        self.lock = threading.Lock()

    def _stream(self, name: str) -> _Stream:
        return self.streams.setdefault(name, _Stream())

    # -- /events ----------------------------------------------------------------------

    def on_sse(self, event: str, data: dict[str, Any]) -> None:
        with self.lock:
            self.connected = True
            if event == "snapshot":
                self.snapshots += 1
                self.streams = {}
            self.agent.update({k: v for k, v in data.items() if k != "streams"})
            for name, st in data.get("streams", {}).items():
                s = self._stream(name)
                s.status.update({k: v for k, v in st.items() if k != "points"})
                s.scores.extend(st.get("points", {}).get("score", []))

    # -- upstream topics --------------------------------------------------------------

    def on_status(self, body: dict[str, Any]) -> None:
        with self.lock:
            self.connected = body.get("status") == "online"
            self.agent.update(
                device=body.get("device"), version=body.get("version", "?"),
                status=body.get("status"), backlog=body.get("backlog"),
                bad_input=sum((body.get("bad_input") or {}).values()),
                upstream_connected=body.get("status") == "online",
                fleet=body.get("fleet"))
            for name, st in (body.get("streams") or {}).items():
                s = self._stream(name)
                s.status.update(st)
                s.status["windows_per_s"] = (st.get("rate") or {}).get("windows_per_s")

    def on_score(self, stream: str, score: float) -> None:
        with self.lock:
            self._stream(stream).scores.append(score)

    def on_summary(self, stream: str, body: dict[str, Any]) -> None:
        """A summary's peak raw score, put on the calibrated scale's 0.5 = threshold."""
        with self.lock:
            s = self._stream(stream)
            thr, score = s.status.get("threshold"), body.get("score") or {}
            peak = score.get("max")
            if thr and peak is not None:
                s.scores.append(min(1.0, 0.5 * peak / thr))


def render(model: WatchModel) -> Group:
    """The whole screen: a header line and one table row per stream."""
    with model.lock:
        a = model.agent
        head = Text()
        head.append(f"edge-agent {a.get('device') or '?'} ", style="bold")
        head.append(f"v{a.get('version', '?')}  ", style="dim")
        head.append("live " if model.connected else "DISCONNECTED ",
                    style="green" if model.connected else "bold red")
        for key, label in (("local_connected", "local"), ("upstream_connected", "upstream")):
            if key in a:
                head.append(f"{label} {'up' if a[key] else 'DOWN'}  ",
                            style="green" if a[key] else "red")
        head.append(f"backlog {a.get('backlog', '-')}  bad input {a.get('bad_input', '-')}  ")
        fleet = a.get("fleet")
        if fleet and fleet.get("rollout"):
            r = fleet["rollout"]
            head.append(f"fleet {r['model']} v{r['version']} {r['phase']}", style="cyan")
        table = Table(expand=False, box=None, padding=(0, 1), header_style="bold")
        for col in ("stream", "state", f"score (0.5 = threshold), last {SPARK_POINTS}", "now",
                    "win/s", "windows", "dropped", "bad in", "alerts", "model"):
            table.add_column(col)
        for name, s in sorted(model.streams.items()):
            st = s.status
            text, style = STATE_STYLE.get(st.get("state", ""), (st.get("state", "?"), ""))
            last = f"{s.scores[-1]:.3f}" if s.scores else "-"
            model_name = f"{st.get('model', '?')} v{st.get('model_version', '?')}"
            wps = st.get("windows_per_s")
            table.add_row(name, Text(text, style=style), sparkline(list(s.scores)), last,
                          "-" if wps is None else f"{wps:.1f}", str(st.get("windows", "-")),
                          str(st.get("windows_dropped", "-")), str(st.get("bad_input", "-")),
                          str(st.get("alerts", "-")), model_name)
    return Group(head, table)


def read_sse(url: str, model: WatchModel, stop: threading.Event,
             token: str | None = None) -> None:
    """Follow a running agent's /events until ``stop``; reconnect after the ``retry:`` hint."""
    retry_s = 2.0
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    while not stop.is_set():
        try:
            req = urllib.request.Request(url, headers=headers)  # noqa: S310 (http(s) only: cli)
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
                event, data = "message", []
                for raw in resp:
                    if stop.is_set():
                        return
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if line.startswith("retry:"):
                        retry_s = int(line[6:].strip() or 2000) / 1000
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif not line and data:
                        model.on_sse(event, json.loads("\n".join(data)))
                        event, data = "message", []
        except (OSError, ValueError, urllib.error.URLError) as e:
            log.debug("events stream ended: %s", e)
        with model.lock:
            model.connected = False
        stop.wait(retry_s)


def read_mqtt(host: str, port: int, device: str, prefix: str, model: WatchModel, *,
              username: str | None = None, password: str | None = None) -> Callable[[], None]:
    """Follow one device's upstream topics; returns a function that disconnects."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    base = f"{prefix}/{device}/"

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
            kind, _, stream = msg.topic[len(base):].partition("/")
            if kind == "status":
                model.on_status(body)
            elif kind == "state" and body.get("score") is not None:
                model.on_score(stream, float(body["score"]))  # Home Assistant's state topic
            elif kind == "alert" and body.get("anomaly_score") is not None:
                model.on_score(stream, float(body["anomaly_score"]))
            elif kind == "summary":
                model.on_summary(stream, body)
        except (ValueError, TypeError, AttributeError) as e:  # a callback must never raise
            log.debug("ignored %s: %s", msg.topic, e)

    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"edge-agent-watch-{time.time_ns()}")
    if username:
        client.username_pw_set(username, password)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(f"{base}#", qos=0)
    client.connect_async(host, port)
    client.loop_start()

    def close() -> None:
        client.loop_stop()
        client.disconnect()

    return close
