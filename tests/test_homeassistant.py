"""Home Assistant MQTT discovery against mosquitto and a real `edge-agent run` process."""

from __future__ import annotations

import json
import re
import threading
import time

import paho.mqtt.client as mqtt

from agent.config import parse_config
from agent.homeassistant import discovery_configs

from .conftest import (
    AgentProcess,
    agent_config,
    anomalous_rows,
    normal_rows,
    publish_all,
    publisher,
    write_config,
)

# The keys Home Assistant's MQTT integration documents for these platforms (full names;
# https://www.home-assistant.io/integrations/binary_sensor.mqtt/ and sensor.mqtt/).
COMMON = {"availability_topic", "availability_template", "payload_available",
          "payload_not_available", "device", "name", "unique_id", "state_topic",
          "value_template", "qos", "origin", "json_attributes_topic", "icon",
          "entity_category", "enabled_by_default", "expire_after", "force_update",
          "object_id", "availability_mode", "json_attributes_template", "encoding"}
DOCUMENTED = {
    "binary_sensor": COMMON | {"payload_on", "payload_off", "device_class", "off_delay"},
    "sensor": COMMON | {"device_class", "state_class", "unit_of_measurement",
                        "suggested_display_precision", "last_reset_value_template",
                        "options"},
}
DEVICE_KEYS = {"identifiers", "connections", "name", "model", "model_id", "manufacturer",
               "sw_version", "hw_version", "serial_number", "suggested_area", "via_device",
               "configuration_url"}
BINARY_SENSOR_CLASSES = {"problem", "connectivity", "running", "safety", "power"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
TOPIC = re.compile(r"^homeassistant/(binary_sensor|sensor)/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config$")


class Subscriber:
    """Records (topic, payload, retained) for every message on a filter."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"ha-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self._cond.notify_all()

    def json(self, topic: str) -> list[dict]:
        with self._cond:
            return [json.loads(p) for t, p, _ in self.messages if t == topic and p]

    def wait_for(self, pred, timeout: float = 15.0) -> bool:
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


def _render(template: str, body: dict):
    """The one template form we use: ``{{ value_json.KEY }}``."""
    m = re.fullmatch(r"\{\{ value_json\.(\w+) \}\}", template)
    assert m, template
    return body[m.group(1)]


def _check_payload(topic: str, cfg: dict) -> None:
    component = TOPIC.match(topic).group(1)
    assert set(cfg) <= DOCUMENTED[component], set(cfg) - DOCUMENTED[component]
    assert {"unique_id", "state_topic", "device", "availability_topic", "name"} <= set(cfg)
    assert set(cfg["device"]) <= DEVICE_KEYS
    assert cfg["device"]["identifiers"] and cfg["device"]["model"] == "edge-agent"
    assert cfg["device"]["sw_version"]
    assert cfg["payload_available"] == "online" and cfg["payload_not_available"] == "offline"
    assert cfg["qos"] in (0, 1, 2)
    if component == "binary_sensor":
        assert cfg["device_class"] in BINARY_SENSOR_CLASSES and cfg["device_class"] == "problem"
        assert {cfg["payload_on"], cfg["payload_off"]} == {"ON", "OFF"}
    else:
        assert cfg["state_class"] in STATE_CLASSES


def test_discovery_payloads_are_unique_per_stream(tmp_path):
    raw = agent_config(tmp_path, 1883)
    raw["streams"].append({**raw["streams"][0], "name": "fan.2", "topic": "sensors/fan"})
    raw["homeassistant"] = {"enabled": True}
    configs = discovery_configs(parse_config(raw), ["pump", "fan.2"])
    assert len(configs) == 4
    for topic, cfg in configs.items():
        assert TOPIC.match(topic), topic
        _check_payload(topic, cfg)
    assert len({c["unique_id"] for c in configs.values()}) == 4


def test_home_assistant_sees_configs_states_and_availability(tmp_path, broker, card):
    raw = agent_config(tmp_path, broker.port)
    raw["homeassistant"] = {"enabled": True, "score_interval_s": 0.5}
    proc = AgentProcess(write_config(tmp_path, raw))
    ha = Subscriber(broker.port, "homeassistant/#")
    edge = Subscriber(broker.port, "edge/dev1/#")
    try:
        assert ha.wait_for(lambda s: len({t for t, _, _ in s.messages
                                          if t.endswith("/config")}) == 2), proc.output()
        configs = {t: json.loads(p) for t, p, _ in ha.messages if t.endswith("/config")}
        for topic, cfg in configs.items():
            _check_payload(topic, cfg)
        problem = next(c for t, c in configs.items() if "/binary_sensor/" in t)
        score = next(c for t, c in configs.items() if "/sensor/" in t)
        state, avail = problem["state_topic"], problem["availability_topic"]
        assert avail == "edge/dev1/status" and score["state_topic"] == state
        # Availability follows the agent's retained status.
        assert edge.wait_for(lambda s: any(
            _render(problem["availability_template"], b) == "online" for b in s.json(avail)))
        # Retained: a subscriber that comes later still gets every config.
        late = Subscriber(broker.port, "homeassistant/+/+/+/config")
        assert late.wait_for(lambda s: len(s.messages) == 2)
        assert all(retained for _, _, retained in late.messages)
        late.close()

        pub = publisher(broker.port)
        rows = normal_rows(card, 200)
        publish_all(pub, "sensors/pump/a", rows)
        assert edge.wait_for(lambda s: any(b["state"] == "normal" for b in s.json(state)))
        assert _render(problem["value_template"], edge.json(state)[-1]) == "OFF"
        publish_all(pub, "sensors/pump/a", anomalous_rows(card, 40, t0=rows[-1]["ts"] + 1))
        assert edge.wait_for(lambda s: any(
            _render(problem["value_template"], b) == "ON" for b in s.json(state))), \
            proc.output()
        on = next(b for b in edge.json(state) if b["problem"] == "ON")
        assert float(_render(score["value_template"], on)) > 0.5
        pub.loop_stop()

        # Home Assistant restarts and says so: the configs come again.
        n = len(ha.messages)
        publish_all(publisher(broker.port), "homeassistant/status", [b"online"])
        assert ha.wait_for(lambda s: len([t for t, _, _ in s.messages[n:]
                                          if t.endswith("/config")]) == 2)

        # Killed: the broker publishes the will, so every entity becomes unavailable.
        proc.kill()
        assert edge.wait_for(lambda s: _render(problem["availability_template"],
                                               s.json(avail)[-1]) == "offline")
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        ha.close()
        edge.close()
