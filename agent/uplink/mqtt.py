"""paho-mqtt client construction shared by the local and upstream connections."""

from __future__ import annotations

import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig, BrokerConfig

__all__ = ["ConnectionMonitor", "describe_connect_error", "make_client"]

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


# A connection that stayed up this long resets the reconnect delay to its
# minimum; one that drops sooner (a broker that accepts, then kicks us) keeps
# doubling, so a flapping broker is not hammered either.
CONNECTION_HELD_S = 30.0
# The same failure reason is logged again at most this often (with a count of
# the attempts in between); a new reason is logged at once.
REPEAT_LOG_EVERY_S = 300.0
# Distinct failure reasons remembered for rate limiting.
REASONS_MAX = 32


def describe_connect_error(exc: BaseException | None) -> str:
    """What an operator should read for a failed connection attempt."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name (DNS: {exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return "connection failed" if exc is None else f"{type(exc).__name__}: {exc}"


class ConnectionMonitor:
    """One broker connection's reconnect backoff and failure log (called from paho callbacks).

    paho doubles its own delay, but ``reconnect_delay_set()`` resets it, and it adds
    no jitter; so the delay is ours: doubled per failure with jitter, up to the
    cap, back to the minimum only after a connection held for ``CONNECTION_HELD_S``.
    Each failure sets paho's min and max to the one delay we chose.
    """

    def __init__(self, client: mqtt.Client, name: str, host: str, port: int, *,
                 min_s: float, max_s: float,
                 monotonic: Callable[[], float] = time.monotonic,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        self.client = client
        self.name = name
        self.where = f"{host}:{port}"
        self.min_s = min_s
        self.max_s = max_s
        self._mono = monotonic
        self._uniform = uniform
        self._base = 0.0
        self._connected_at: float | None = None
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, attempts)
        self._refused = False
        self.failures = 0
        self.last_error: str | None = None
        self.last_error_ts: float | None = None
        self.next_delay_s = 0.0
        self._set_delay(self._jitter(min_s))

    def _jitter(self, base: float) -> float:
        # +-25 %: a fleet that lost the same broker does not come back in lockstep.
        return min(self.max_s, max(self.min_s / 2, base * self._uniform(0.75, 1.25)))

    def _set_delay(self, delay: float) -> None:
        self.next_delay_s = delay
        self.client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def connected(self) -> None:
        """CONNACK with success."""
        self._connected_at = self._mono()
        self._refused = False
        if self.last_error is not None:
            log.info("%s broker %s: connected again after %s", self.name, self.where,
                     self.last_error)
        self.last_error = None

    def refused(self, reason: str) -> None:
        """CONNACK with a failure reason (not authorised, bad credentials...)."""
        self._refused = True
        self.failed(f"the broker refused the connection: {reason}")

    def disconnected(self, reason: str) -> None:
        """paho's on_disconnect; after a refused CONNACK it is the same failure."""
        if self._refused:
            self._refused = False
            return
        self.failed(f"disconnected: {reason}", dropped=True)

    def connect_failed(self, exc: BaseException | None) -> None:
        """paho's on_connect_fail: the socket, TLS or DNS step raised ``exc``."""
        self.failed(describe_connect_error(exc))

    def failed(self, reason: str, *, dropped: bool = False) -> None:
        """One failed attempt (or dropped connection): grow the delay, say why (rate-limited)."""
        now = self._mono()
        held = self._connected_at is not None and now - self._connected_at >= CONNECTION_HELD_S
        self._connected_at = None
        self._base = self.min_s if held or not self._base else min(self.max_s, self._base * 2)
        self._set_delay(self._jitter(self._base))
        self.failures += 1
        self.last_error = reason
        self.last_error_ts = time.time()
        last, since = self._logged.get(reason, (-math.inf, 0))
        if now - last >= REPEAT_LOG_EVERY_S:
            if len(self._logged) >= REASONS_MAX:
                self._logged.clear()
            self._logged[reason] = (now, 0)
            more = f" ({since} more attempt(s) failed the same way)" if since else ""
            if dropped:
                log.warning("%s broker disconnected (%s: %s)%s; retrying in %.1f s", self.name,
                            self.where, reason[len("disconnected: "):], more, self.next_delay_s)
            else:
                log.warning("%s broker %s: %s%s; retrying in %.1f s", self.name, self.where,
                            reason, more, self.next_delay_s)
        else:
            self._logged[reason] = (last, since + 1)

    def stats(self) -> dict[str, Any]:
        return {"failures": self.failures, "last_error": self.last_error,
                "retry_in_s": round(self.next_delay_s, 1)}
