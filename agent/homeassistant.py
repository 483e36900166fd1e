"""Home Assistant MQTT discovery: per stream a problem binary_sensor and a score sensor.

Configs and states go out on the upstream connection, retained, so that the
agent's retained online/offline status (with its LWT) is their availability.
Configs are published on every upstream connect and again whenever Home
Assistant announces itself on ``{discovery_prefix}/status``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from agent import __version__
from agent.config import AgentConfig
from agent.pipeline import Episode, Event, ScoreBatch, StreamPipeline

if TYPE_CHECKING:
    from agent.daemon import Agent
    from agent.uplink.uplink import Uplink

__all__ = ["HomeAssistant", "attach", "discovery_configs", "state_topic"]

log = logging.getLogger(__name__)

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _safe(text: str) -> str:
    """A discovery topic level: Home Assistant allows letters, digits, '_' and '-'."""
    return _ID_UNSAFE.sub("_", text)


def state_topic(cfg: AgentConfig, stream: str) -> str:
    return f"{cfg.upstream.prefix}/{cfg.device_id}/state/{stream}"


def discovery_configs(cfg: AgentConfig, streams: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Discovery topic -> config payload, two per stream."""
    dev, dp = cfg.device_id, cfg.homeassistant.discovery_prefix
    common: dict[str, Any] = {
        "availability_topic": f"{cfg.upstream.prefix}/{dev}/status",
        "availability_template": "{{ value_json.status }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {"identifiers": [f"edge-agent_{dev}"], "name": f"edge-agent {dev}",
                   "model": "edge-agent", "manufacturer": "edge-agent",
                   "sw_version": __version__},
        "origin": {"name": "edge-agent", "sw_version": __version__},
        "qos": 1,
    }
    out: dict[str, dict[str, Any]] = {}
    for s in streams:
        st = state_topic(cfg, s)
        uid = f"edge-agent_{_safe(dev)}_{_safe(s)}"
        out[f"{dp}/binary_sensor/{_safe(dev)}/{_safe(s)}_problem/config"] = {
            **common, "name": f"{s} problem", "unique_id": f"{uid}_problem",
            "state_topic": st, "value_template": "{{ value_json.problem }}",
            "payload_on": "ON", "payload_off": "OFF", "device_class": "problem",
            "json_attributes_topic": st,
        }
        out[f"{dp}/sensor/{_safe(dev)}/{_safe(s)}_score/config"] = {
            **common, "name": f"{s} anomaly score", "unique_id": f"{uid}_score",
            "state_topic": st, "value_template": "{{ value_json.score }}",
            "state_class": "measurement", "suggested_display_precision": 3,
            "icon": "mdi:chart-bell-curve",
        }
    return out


@dataclass
class _StreamState:
    state: str
    episode: int
    score: float = 0.0
    urgent: bool = True  # an episode opened or closed: publish at the next step
    changed: bool = True
    sent_at: float = -1e18


class HomeAssistant:
    """Feeds on pipeline events; publishes from the inference thread's step hook."""

    def __init__(self, cfg: AgentConfig, uplink: Uplink, streams: Sequence[StreamPipeline],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._uplink = uplink
        self._clock = clock
        self._lock = threading.Lock()
        self._streams = {p.cfg.name: _StreamState(p.state, p.episodes.episode) for p in streams}
        self._seen_connects = 0
        self._announce = False  # Home Assistant said online: send the configs again
        self.published_configs = 0
        uplink.subscribe(f"{cfg.homeassistant.discovery_prefix}/status", 1, self._on_ha_status)

    def _on_ha_status(self, msg: mqtt.MQTTMessage) -> None:
        if msg.payload.strip() == b"online":
            log.info("Home Assistant is online: publishing discovery again")
            self._announce = True

    def observe(self, p: StreamPipeline, events: list[Event]) -> None:
        """The daemon's observer hook: remember the latest score and episode state."""
        with self._lock:
            s = self._streams.get(p.cfg.name)
            if s is None:
                return
            for e in events:
                if isinstance(e, ScoreBatch) and len(e.anomaly):
                    s.score = float(e.anomaly[-1])
                    s.changed = True
                elif isinstance(e, Episode):
                    s.urgent = True
                    s.episode = e.episode
            state = p.state
            if state != s.state:
                s.state, s.urgent = state, True

    def step(self) -> None:
        """Publish what is due: configs after a (re)connect or a birth message, then states."""
        up = self._uplink
        if not up.connected.is_set():
            return
        if up.connects != self._seen_connects or self._announce:
            self._seen_connects, self._announce = up.connects, False
            self._publish_configs()
            with self._lock:
                for s in self._streams.values():
                    s.urgent = True
        now = self._clock()
        interval = self.cfg.homeassistant.score_interval_s
        due: list[tuple[str, dict[str, Any]]] = []
        with self._lock:
            for name, s in self._streams.items():
                if s.urgent or (s.changed and now - s.sent_at >= interval):
                    due.append((name, {"problem": "ON" if s.state == "anomaly" else "OFF",
                                       "score": round(s.score, 4), "state": s.state,
                                       "episode": s.episode}))
                    s.urgent = s.changed = False
                    s.sent_at = now
        for name, body in due:
            up.client.publish(state_topic(self.cfg, name), json.dumps(body), qos=1, retain=True)

    def _publish_configs(self) -> None:
        configs = discovery_configs(self.cfg, list(self._streams))
        for topic, body in configs.items():
            self._uplink.client.publish(topic, json.dumps(body), qos=1, retain=True)
        self.published_configs += len(configs)
        log.info("Home Assistant discovery: %d config(s) published under %s/", len(configs),
                 self.cfg.homeassistant.discovery_prefix)


def attach(agent: Agent) -> HomeAssistant:
    """Wire Home Assistant discovery into an agent (before ``agent.start()``)."""
    ha = HomeAssistant(agent.cfg, agent.uplink, agent.streams)
    agent.observers.append(ha.observe)
    agent.step_hooks.append(ha.step)
    return ha
