"""paho-mqtt client construction shared by the local and upstream connections."""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig, BrokerConfig

__all__ = ["make_client"]

log = logging.getLogger(__name__)

# Reconnect backoff bounds (seconds); paho adds no jitter of its own, the
# callers add theirs by choosing when to call reconnect.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30


def _nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # paho never sets TCP_NODELAY; without it a relay adds ~1 ms per hop (PERFORMANCE.md).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as e:  # a websocket or unix socket has no such option
        log.debug("TCP_NODELAY not set: %s", e)


def make_client(
    cfg: AgentConfig,
    broker: BrokerConfig,
    role: str,
    *,
    protocol: int = mqtt.MQTTv5,
    persistent: bool = False,
) -> mqtt.Client:
    """A configured, not yet connected paho client (callback API version 2)."""
    client_id = broker.client_id or f"edge-agent-{cfg.device_id}-{role}"
    kwargs: dict[str, Any] = {
        "callback_api_version": CallbackAPIVersion.VERSION2,
        "client_id": client_id,
        "protocol": protocol,
    }
    if protocol != mqtt.MQTTv5:
        kwargs["clean_session"] = not persistent
    client = mqtt.Client(**kwargs)
    client.on_socket_open = _nodelay
    client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls is not None:
        t = broker.tls
        client.tls_set(
            ca_certs=str(cfg.resolve(t.ca_file)) if t.ca_file else None,
            certfile=str(cfg.resolve(t.cert_file)) if t.cert_file else None,
            keyfile=str(cfg.resolve(t.key_file)) if t.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(t.insecure)
    return client


def connect_properties(persistent: bool, expiry_s: int = 7 * 24 * 3600) -> Any:
    """MQTT 5 CONNECT properties: a session that outlives a disconnect when persistent."""
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if persistent:
        props.SessionExpiryInterval = expiry_s
    return props
