"""What can be checked before starting: state_dir, ports, TLS files, models, topic filters.

``edge-agent check-config`` prints every problem; ``edge-agent run`` exits 78
(EX_CONFIG, which the unit does not restart) on any, each as one
``key: value: problem`` line, instead of a bare errno after start-up.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl

from agent.config import AgentConfig
from agent.service.affinity import cpu_problem

__all__ = ["bind_problem", "filters_overlap", "preflight"]


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters (then a message would feed both streams)."""
    la, lb = a.split("/"), b.split("/")
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else None
        y = lb[i] if i < len(lb) else None
        if x == "#" or y == "#":  # '#' also matches its parent level
            return True
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
    return True


def bind_problem(host: str, port: int, e: OSError) -> str:
    """The health endpoint's bind failure as one line naming the key and the value."""
    if e.errno == errno.EADDRINUSE:
        return f"service.health.port: {host}:{port} is already in use"
    if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
        return f"service.health.host: {host}: cannot listen on it ({e.strerror or e})"
    return f"service.health.port: {host}:{port}: cannot listen ({e.strerror or e})"


def _state_dir(cfg: AgentConfig) -> list[str]:
    path = cfg.resolve(cfg.state_dir)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"state_dir: {cfg.state_dir}: cannot be created ({probe} is not a directory)"]
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created ({probe} is read-only)"
        return [f"state_dir: {cfg.state_dir}: {what}"]
    return []


def _health_port(cfg: AgentConfig) -> list[str]:
    hc = cfg.service.health
    if not hc.port:
        return []
    try:
        infos = socket.getaddrinfo(hc.host, hc.port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            # As the HTTP server binds (allow_reuse_address): TIME_WAIT is not "in use".
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        return [bind_problem(hc.host, hc.port, e)]
    return []


def _tls(cfg: AgentConfig) -> list[str]:
    problems = []
    for section, tls in (("local", cfg.local.tls), ("upstream", cfg.upstream.tls)):
        if tls is None:
            continue
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if tls.ca_file and cfg.resolve(tls.ca_file).is_file():
            try:
                ctx.load_verify_locations(cafile=str(cfg.resolve(tls.ca_file)))
            except (ssl.SSLError, OSError) as e:
                problems.append(f"{section}.tls.ca_file: {tls.ca_file}: not a PEM CA "
                                f"certificate ({getattr(e, 'reason', None) or e})")
        if tls.cert_file and tls.key_file and cfg.resolve(tls.cert_file).is_file() \
                and cfg.resolve(tls.key_file).is_file():
            try:
                ctx.load_cert_chain(str(cfg.resolve(tls.cert_file)),
                                    str(cfg.resolve(tls.key_file)))
            except (ssl.SSLError, OSError) as e:
                why = getattr(e, "reason", None) or e
                problems.append(f"{section}.tls.cert_file: {tls.cert_file} with key_file "
                                f"{tls.key_file}: does not load ({why})")
    return problems


def _overlaps(cfg: AgentConfig) -> list[str]:
    problems = []
    for j, b in enumerate(cfg.streams):
        for i, a in enumerate(cfg.streams[:j]):
            if filters_overlap(a.topic, b.topic):
                problems.append(f"streams[{j}].topic: {b.topic!r} overlaps streams[{i}].topic "
                                f"{a.topic!r}: a message would feed both streams; make the "
                                f"filters disjoint")
    return problems


def preflight(cfg: AgentConfig, *, models: bool = True) -> list[str]:
    """Every problem found without starting, as ``key: value: problem`` lines."""
    problems = [*_state_dir(cfg), *_health_port(cfg), *_tls(cfg), *_overlaps(cfg)]
    cpu = cpu_problem(cfg)
    if cpu is not None:
        problems.append(cpu)
    if models:
        from agent.scoring import ModelError  # noqa: PLC0415
        from agent.scoring.registry import open_stream_model  # noqa: PLC0415

        for i, s in enumerate(cfg.streams):
            try:
                open_stream_model(cfg, s)
            except ModelError as e:
                problems.append(f"streams[{i}].model: {e}")
    return problems

