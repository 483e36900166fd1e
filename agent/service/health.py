"""Is the pipeline progressing, and a local HTTP endpoint that says so (/healthz, /metrics),
plus the live page (/) and its server-sent events (/events)."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# Re-exported: the checks live apart so that an agent without the endpoint never
# imports prometheus_client or http.server.
from agent.service.checks import Health, check_pipeline

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from agent.daemon import Agent
    from agent.service.live import LiveView

__all__ = ["AgentCollector", "Health", "HealthServer", "check_pipeline", "metrics_registry"]

log = logging.getLogger(__name__)


class AgentCollector(Collector):
    """Reads the agent's own counters at scrape time (nothing is counted twice)."""

    def __init__(self, agent: Agent, health: Callable[[], Health]) -> None:
        self._agent = agent
        self._health = health

    def collect(self) -> Iterable[Metric]:
        a = self._agent
        st = a.status()
        yield InfoMetricFamily("edge_agent", "edge-agent build and device",
                               value={"version": st["version"], "device": a.cfg.device_id})
        yield GaugeMetricFamily("edge_agent_uptime_seconds", "seconds since the agent started",
                                value=st["uptime_s"])
        h = self._health()
        yield GaugeMetricFamily("edge_agent_healthy",
                                "1 while the pipeline progresses (the watchdog is petted)",
                                value=1.0 if h.ok else 0.0)
        conn = GaugeMetricFamily("edge_agent_broker_connected", "1 while connected",
                                 labels=["broker"])
        conn.add_metric(["local"], 1.0 if a.local_connected.is_set() else 0.0)
        conn.add_metric(["upstream"], 1.0 if a.uplink.connected.is_set() else 0.0)
        yield conn
        yield GaugeMetricFamily("edge_agent_outbox_backlog",
                                "messages waiting in the outbox for a PUBACK", value=st["backlog"])
        evicted = CounterMetricFamily("edge_agent_outbox_evicted",
                                      "messages evicted from the outbox over its budget",
                                      labels=["kind"])
        for kind, n in sorted(st["evicted"].items()):
            evicted.add_metric([kind], n)
        yield evicted
        ob = st["outbox"]
        yield GaugeMetricFamily("edge_agent_outbox_degraded",
                                "1 while the disk refuses outbox writes (full disk)",
                                value=1.0 if ob["degraded"] else 0.0)
        yield GaugeMetricFamily("edge_agent_outbox_memory_queue",
                                "messages the disk refused, waiting in memory",
                                value=ob["memory_queue"])
        yield CounterMetricFamily("edge_agent_outbox_errors",
                                  "outbox writes refused (disk full or database error)",
                                  value=st["outbox_errors"])
        yield CounterMetricFamily("edge_agent_outbox_dropped",
                                  "refused messages pushed out of the memory queue",
                                  value=ob["dropped"])
        fails = CounterMetricFamily("edge_agent_broker_connect_failures",
                                    "failed connection attempts and dropped connections",
                                    labels=["broker"])
        fails.add_metric(["local"], a.ingest.conn.failures)
        fails.add_metric(["upstream"], a.uplink.conn.failures)
        yield fails
        up = a.uplink
        for name, doc, v in (
            ("delivered", "messages acknowledged by the cloud broker", up.delivered),
            ("rejected", "PUBACKs with a failure reason code", up.rejected),
            ("connects", "successful connections to the cloud broker", up.connects),
        ):
            yield CounterMetricFamily(f"edge_agent_uplink_{name}", doc, value=v)
        yield CounterMetricFamily("edge_agent_callback_errors",
                                  "exceptions caught in MQTT callbacks",
                                  value=a.callback_errors + a.ingest.callback_errors
                                  + up.callback_errors)
        bad = CounterMetricFamily("edge_agent_bad_input", "rejected sensor input by kind",
                                  labels=["kind"])
        for kind, n in sorted(st["bad_input"].items()):
            bad.add_metric([kind], n)
        yield bad
        yield from self._stream_metrics(st["streams"])

    @staticmethod
    def _stream_metrics(streams: dict[str, dict[str, Any]]) -> Iterable[Metric]:
        counters = {
            "samples": ("edge_agent_samples", "sensor samples accepted"),
            "windows": ("edge_agent_windows_scored", "windows scored by the model"),
            "windows_dropped": ("edge_agent_windows_dropped",
                                "windows dropped because scoring fell behind"),
            "alerts": ("edge_agent_alerts", "alerts raised"),
        }
        families = {k: CounterMetricFamily(n, d, labels=["stream"])
                    for k, (n, d) in counters.items()}
        thr = GaugeMetricFamily("edge_agent_alert_threshold",
                                "current alert threshold (absent during auto warm-up)",
                                labels=["stream"])
        for name, s in sorted(streams.items()):
            for k, fam in families.items():
                fam.add_metric([name], s[k])
            t = s["threshold"]
            if t is not None:
                thr.add_metric([name], t)
        yield from families.values()
        yield thr


def metrics_registry(agent: Agent, health: Callable[[], Health]) -> CollectorRegistry:
    """A registry of this agent's metrics plus the process's CPU and memory."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(agent, health))
    ProcessCollector(registry=reg)
    return reg


_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png",
                 ".LICENSE": "text/plain; charset=utf-8"}
# A write to a page that stopped reading gives up after this long (frees its thread).
SEND_TIMEOUT_S = 30.0
# How often an idle event stream checks that its page is still there.
PEER_CHECK_S = 1.0


def _peer_gone(sock: socket.socket) -> bool:
    """Whether the other end of an event stream hung up (it never sends after its request)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The live page's files, read once from the package: name -> (body, content type)."""
    out = {}
    for f in resources.files("agent.service").joinpath("static").iterdir():
        ext = "." + f.name.rsplit(".", 1)[-1]
        if f.is_file() and ext in _STATIC_TYPES:
            out[f.name] = (f.read_bytes(), _STATIC_TYPES[ext])
    return out


class HealthServer:
    """``GET /healthz`` (200 or 503 with reasons) and ``GET /metrics`` on a local port;
    with a live view, also the page on ``/`` and server-sent events on ``/events``."""

    def __init__(self, host: str, port: int, health: Callable[[], Health],
                 registry: CollectorRegistry, *, live: LiveView | None = None,
                 token: str | None = None) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = SEND_TIMEOUT_S

            def do_GET(self) -> None:
                outer._serve(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health endpoint: %s", format % args)

        self._health = health
        self._registry = registry
        self._live = live
        self._token = token
        self._static = _static_files() if live is not None else {}
        self.errors = 0
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def _authorized(self, req: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> bool:
        """No token configured, or it came as a Bearer token, a basic-auth password or ?token=."""
        if self._token is None:
            return True
        given = query.get("token", [""])[0]
        auth = req.headers.get("Authorization", "")
        scheme, _, cred = auth.partition(" ")
        if scheme.lower() == "bearer":
            given = cred.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(cred.strip(), validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = ""
        return hmac.compare_digest(given.encode(), self._token.encode())

    def _serve(self, req: BaseHTTPRequestHandler) -> None:
        path, _, qs = req.path.partition("?")
        headers: dict[str, str] = {}
        try:
            if path == "/healthz":
                h = self._health()
                code = HTTPStatus.OK if h.ok else HTTPStatus.SERVICE_UNAVAILABLE
                status = "wedged" if not h.ok else "degraded" if h.degraded else "ok"
                body = json.dumps({"status": status, "problems": h.problems,
                                   "degraded": h.degraded,
                                   "warnings": h.warnings}).encode() + b"\n"
                ctype = "application/json"
            elif path == "/metrics":
                encoder, ctype = choose_encoder(req.headers.get("Accept", ""))
                body = encoder(self._registry)
                code = HTTPStatus.OK
            elif self._live is not None and path in ("/", "/index.html", "/events"):
                if not self._authorized(req, parse_qs(qs)):
                    code, ctype, body = HTTPStatus.UNAUTHORIZED, "text/plain", b"token needed\n"
                    headers["WWW-Authenticate"] = 'Basic realm="edge-agent", charset="UTF-8"'
                elif path == "/events":
                    self._events(req, self._live)
                    return
                else:
                    body, ctype = self._static["index.html"]
                    code = HTTPStatus.OK
                    headers["Cache-Control"] = "no-cache"
            elif path.startswith("/static/") and path[8:] in self._static:
                body, ctype = self._static[path[8:]]
                code = HTTPStatus.OK
                headers["Cache-Control"] = "max-age=3600"
            else:
                code, ctype = HTTPStatus.NOT_FOUND, "text/plain"
                body = (b"try /, /events, /healthz or /metrics\n" if self._live is not None
                        else b"try /healthz or /metrics\n")
        except Exception as e:  # a bug must cost one request, not the endpoint
            self.errors += 1
            log.exception("health endpoint failed on %s", path)
            code, ctype, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", f"{e}\n".encode()
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            req.send_header(k, v)
        req.end_headers()
        req.wfile.write(body)

    def _events(self, req: BaseHTTPRequestHandler, live: LiveView) -> None:
        """Server-sent events: a snapshot, then coalesced updates and keep-alives until gone."""
        joined = live.connect()
        if joined is None:
            body = b"too many live clients\n"
            req.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
            req.send_header("Content-Type", "text/plain")
            req.send_header("Content-Length", str(len(body)))
            req.send_header("Retry-After", "10")
            req.end_headers()
            req.wfile.write(body)
            return
        client, snapshot = joined
        try:
            req.send_response(HTTPStatus.OK)
            req.send_header("Content-Type", "text/event-stream")
            req.send_header("Cache-Control", "no-cache")
            req.send_header("X-Accel-Buffering", "no")
            req.end_headers()
            req.wfile.write(snapshot)
            req.wfile.flush()
            sent = time.monotonic()
            while True:
                frame = client.get(PEER_CHECK_S)
                if client.closed:
                    break
                if frame is None:
                    # A closed tab must free its slot now, not at the next failed write.
                    if _peer_gone(req.connection):
                        break
                    if time.monotonic() - sent < live.cfg.keepalive_s:
                        continue
                    # A comment line keeps proxies and the browser from timing the stream out.
                    frame = b": keep-alive\n\n"
                req.wfile.write(frame)
                req.wfile.flush()
                sent = time.monotonic()
        except OSError as e:  # the page went away (reset, broken pipe, send timeout)
            log.debug("live client gone: %s", e)
        finally:
            live.disconnect(client)
            req.close_connection = True

    def start(self) -> None:
        if self._live is not None:
            self._live.start()
        self._thread = threading.Thread(target=self._server.serve_forever, name="health",
                                        daemon=True)
        self._thread.start()
        host = self.host
        log.info("health endpoint on http://%s:%d/healthz and /metrics%s", host, self.port,
                 f", live page on http://{host}:{self.port}/" if self._live is not None else "")

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()  # ends the event streams, so their threads return
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
