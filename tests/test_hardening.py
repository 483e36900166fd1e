"""Issue 12, hardening from a hostile probe: connection failures said once with the reason,
a backoff that grows, exit 78 with `key: value: problem`, payload limits, rate-limited logs,
overlapping filters refused, unset device clocks. Real mosquitto, real sockets, real processes."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.broker import LocalBroker, free_port
from agent.config import parse_config
from agent.daemon import Agent
from agent.decode import LogLimiter
from agent.service.preflight import filters_overlap
from agent.uplink.mqtt import CONNECTION_HELD_S, ConnectionMonitor
from agent.uplink.outbox import Outbox
from agent.uplink.uplink import Uplink

from .conftest import (
    SKAB_FIELDS,
    AgentProcess,
    Cloud,
    agent_config,
    normal_rows,
    publish_all,
    publisher,
    wait_until,
    write_config,
)
from .fleet_support import key, start_agent  # noqa: F401  (fixtures)
from .test_uplink_security import pki  # noqa: F401  (a fixture)

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")



# -- backoff --------------------------------------------------------------------------


class _Paho:
    """Records what the monitor asks of paho's reconnect delay."""

    def __init__(self) -> None:
        self.delays: list[tuple[float, float]] = []

    def reconnect_delay_set(self, min_delay: float, max_delay: float) -> None:
        self.delays.append((min_delay, max_delay))


def test_backoff_doubles_with_jitter_to_the_cap_and_resets_only_after_a_held_connection():
    now = [0.0]
    paho = _Paho()
    m = ConnectionMonitor(paho, "upstream", "h", 1, min_s=1.0, max_s=8.0,  # type: ignore[arg-type]
                          monotonic=lambda: now[0], uniform=lambda a, b: 1.0)
    for _ in range(6):
        m.failed("refused")
    # The old code re-set paho's bounds on every failure, which reset paho's own
    # doubling: every wait was the minimum (14 attempts in 14 s).
    assert [d for d, _ in paho.delays[1:]] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    m.connected()
    now[0] += 5.0  # a connection that did not hold: keep backing off
    m.disconnected("kicked")
    assert m.next_delay_s == 8.0
    m.connected()
    now[0] += CONNECTION_HELD_S + 1
    m.disconnected("broker restart")
    assert m.next_delay_s == 1.0
    jittered = ConnectionMonitor(_Paho(), "u", "h", 1, min_s=4.0, max_s=100.0)  # type: ignore[arg-type]
    delays = set()
    for _ in range(20):
        jittered.failed("x")
        delays.add(round(jittered.next_delay_s, 3))
        jittered._base = 2.0  # the next failure doubles it to 4: sample that jitter
    assert len(delays) > 5 and all(3.0 <= d <= 5.0 for d in delays)


# -- connection failures: reason logged once, then counted --------------------------------


def _uplink(tmp_path: Path, local_port: int, **upstream: Any) -> Uplink:
    raw = agent_config(tmp_path, local_port)
    raw["upstream"].update(reconnect_min_s=0.1, reconnect_max_s=0.2, **upstream)
    cfg = parse_config(raw, base_dir=tmp_path)
    return Uplink(cfg, Outbox(tmp_path / "o.db"), lambda: {})


@pytest.mark.parametrize("case", ["refused", "dns", "not_authorised", "wrong_ca"])
def test_connection_failure_is_logged_once_with_host_port_and_reason(
        tmp_path, broker, case, caplog, request):
    host, port, extra = "127.0.0.1", free_port(), {}
    expect = "connection refused"
    if case == "dns":
        host, expect = "no-such-host.invalid", "cannot resolve the host name"
    elif case == "not_authorised":
        b = LocalBroker("listener {port} 127.0.0.1\nallow_anonymous false\n",
                        workdir=tmp_path / "closed").start()
        request.addfinalizer(b.close)
        port, expect = b.port, "refused the connection: Not authorized"
    elif case == "wrong_ca":
        d = request.getfixturevalue("pki")
        conf = (f"listener {{port}} 127.0.0.1\nallow_anonymous true\n"
                f"certfile {d / 'server.pem'}\nkeyfile {d / 'server.key'}\n")
        b = LocalBroker(conf, workdir=tmp_path / "tls").start()
        request.addfinalizer(b.close)
        # A CA that did not sign the server's certificate (its own self-signed cert).
        port, expect = b.port, "TLS certificate verify failed"
        extra = {"tls": {"ca_file": str(d / "client.pem")}}
    caplog.set_level(logging.INFO, logger="agent")
    up = _uplink(tmp_path, broker.port, host=host, port=port, **extra)
    up.start()
    try:
        assert wait_until(lambda: up.conn.failures >= 4, timeout=20), up.conn.stats()
    finally:
        up.stop(drain_timeout=0)
    assert expect in (up.conn.last_error or "")
    lines = [r.getMessage() for r in caplog.records if "upstream broker" in r.getMessage()]
    assert len(lines) == 1, lines  # once per distinct reason, not once per attempt
    assert f"{host}:{port}" in lines[0] and expect in lines[0]
    assert up.stats()["last_error"] == up.conn.last_error  # the status topic carries it


def test_local_broker_failure_is_logged_and_in_healthz(tmp_path):
    port = free_port()
    cfg = agent_config(tmp_path, port)  # nothing listens: both brokers refuse
    health = free_port()
    cfg["service"] = {"health": {"port": health}, "ready_timeout_s": 1}
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log(f"local broker 127.0.0.1:{port}: connection refused"), proc.output()

        def healthz() -> dict[str, Any]:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=5) as r:
                return json.loads(r.read())

        assert wait_until(lambda: proc.wait_log("ready without", 0.1), timeout=15)
        body = healthz()
        assert any("connection refused" in w and f"127.0.0.1:{port}" in w
                   for w in body["warnings"]), body
        assert "connection refused" in proc.output().split("ready without", 1)[1].split("\n")[0]
    finally:
        assert proc.terminate() == 0


# -- exit 78 with key: value: problem ------------------------------------------------


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE_AGENT, *args], capture_output=True, text=True, timeout=timeout)


def _start_fails(tmp_path: Path, cfg: dict[str, Any], expect: str) -> None:
    path = write_config(tmp_path, cfg)
    r = _run("run", "--config", str(path))
    assert r.returncode == 78, (r.returncode, r.stderr)
    assert expect in r.stderr, r.stderr
    assert "Errno" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    c = _run("check-config", str(path))
    assert c.returncode == 1 and expect in c.stderr, c.stderr


def test_state_dir_that_cannot_be_created_exits_78(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = agent_config(tmp_path, free_port())
    cfg["state_dir"] = str(tmp_path / "file" / "state")
    _start_fails(tmp_path, cfg, f"state_dir: {tmp_path}/file/state: cannot be created")


def test_health_port_in_use_and_bad_host_exit_78(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = agent_config(tmp_path, free_port())
        cfg["service"] = {"health": {"port": port}}
        _start_fails(tmp_path, cfg, f"service.health.port: 127.0.0.1:{port} is already in use")
    # A token, as any host beyond loopback needs for the live page: the bind is what fails.
    cfg["service"] = {"health": {"port": free_port(), "host": "192.0.2.1",
                                 "token": "a-long-enough-token"}}
    _start_fails(tmp_path, cfg, "service.health.host: 192.0.2.1: cannot listen on it")


def test_ca_file_that_is_not_pem_exits_78(tmp_path):
    (tmp_path / "ca.pem").write_bytes(b"not a certificate\n")
    cfg = agent_config(tmp_path, free_port())
    cfg["upstream"]["tls"] = {"ca_file": str(tmp_path / "ca.pem")}
    _start_fails(tmp_path, cfg, f"upstream.tls.ca_file: {tmp_path}/ca.pem: not a PEM CA")


def test_model_that_is_random_bytes_exits_78(tmp_path):
    from agent.scoring import find_model

    src = find_model("skab-ae", Path(__file__).resolve().parent.parent)
    d = tmp_path / "m"
    d.mkdir()
    card = json.loads(Path(src).read_text()) if Path(src).is_file() else None
    if card is None:
        card = json.loads((Path(src) / "model.json").read_text())
    (d / "model.json").write_text(json.dumps(card))
    (d / card["file"]).write_bytes(bytes(range(256)) * 10)
    cfg = agent_config(tmp_path, free_port(), model=str(d))
    _start_fails(tmp_path, cfg, "streams[0].model:")
    cfg = agent_config(tmp_path, free_port(), model=str(tmp_path / "nope"))
    _start_fails(tmp_path, cfg, "streams[0].model:")


def test_overlapping_stream_filters_are_refused(tmp_path):
    assert filters_overlap("sensors/#", "sensors/pump")
    assert filters_overlap("sensors/+/t", "sensors/pump/+")
    assert filters_overlap("sensors/#", "sensors")
    assert not filters_overlap("sensors/pump/+", "sensors/motor/+")
    assert not filters_overlap("a/b", "a/b/c")
    cfg = agent_config(tmp_path, free_port(), topic="sensors/#")
    second = dict(cfg["streams"][0], name="pump2", topic="sensors/pump")
    cfg["streams"].append(second)
    _start_fails(tmp_path, cfg, "streams[1].topic: 'sensors/pump' overlaps streams[0].topic "
                                "'sensors/#'")


# -- per-message paths: limits, rate-limited logs, callbacks that never raise ----------------


def test_log_limiter_bursts_then_counts():
    now = [0.0]
    out: list[str] = []

    class _L(logging.Logger):
        def log(self, level: int, msg: object, *args: Any, **kw: Any) -> None:  # type: ignore[override]
            out.append(str(msg) % args)

    lim = LogLimiter(_L("x"), burst=3, refill_s=10.0, monotonic=lambda: now[0])
    for i in range(100):
        lim.warning("line %d", i)
    assert len(out) == 3 and lim.suppressed == 97
    now[0] += 10.0
    lim.warning("after")
    assert out[-1] == "after [97 similar line(s) suppressed]"


def _agent(tmp_path: Path, port: int, **stream: Any) -> Agent:
    raw = agent_config(tmp_path, port, **stream)
    return Agent(parse_config(raw, base_dir=tmp_path))


def test_feedback_and_payload_floods_are_counted_not_logged(tmp_path, broker, caplog):
    caplog.set_level(logging.INFO)
    agent = _agent(tmp_path, broker.port, max_payload_bytes=4096)
    agent.start()
    pub = publisher(broker.port)
    try:
        assert agent.wait_connected(15)
        deep = b"[" * 100_000 + b"]" * 100_000  # RecursionError in json.loads
        publish_all(pub, "edge/dev1/feedback/pump", [deep] * 300)
        big = json.dumps({"ts": [1.7e9] * 400, **{f: [1.0] * 400 for f in SKAB_FIELDS}})
        assert len(big) > 4096
        publish_all(pub, "sensors/pump/a", [big] * 300)
        publish_all(pub, "sensors/pump/a", normal_rows(_card(), 20, t0=1.8e9))

        def counted() -> bool:
            b = agent.status()["bad_input"]
            return b.get("feedback", 0) >= 300 and b.get("oversize", 0) >= 300
        assert wait_until(counted, timeout=30), agent.status()["bad_input"]
        # Valid readings after the flood are still taken.
        assert wait_until(lambda: agent.streams[0].samples >= 20, timeout=15), \
            agent.streams[0].samples
        st = agent.status()
    finally:
        pub.loop_stop()
        agent.stop(drain_timeout=0)
    assert st["callback_errors"] == 0 and agent.ingest.callback_errors == 0
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING
             and ("feedback" in r.getMessage() or "oversize" in r.getMessage())]
    assert len(noisy) <= 4, [r.getMessage()[:120] for r in noisy]
    assert not any(r.exc_info for r in caplog.records)


def _card() -> Any:
    from agent.scoring import find_model, load_card

    return load_card(find_model("skab-ae", Path(__file__).resolve().parent.parent))


def test_unset_device_clock_uses_receive_time_and_says_so(tmp_path, broker):
    cloud = Cloud(broker.port)
    cfg = agent_config(tmp_path, broker.port, warmup=32)
    cfg["streams"][0]["alert"] = {"threshold": 0.0, "cooldown_s": 0}
    proc = AgentProcess(write_config(tmp_path, cfg))
    pub = publisher(broker.port)
    try:
        assert proc.wait_log("upstream connected"), proc.output()
        assert proc.wait_log("subscribed to"), proc.output()
        before = time.time()
        # ts 0 .. 99: a sensor whose clock was never set (1970).
        publish_all(pub, "sensors/pump/a", normal_rows(_card(), 100, t0=0.0))
        assert cloud.wait_for(lambda c: len(c.of("alert")) >= 1, timeout=30), proc.output()
        alert = cloud.of("alert")[0]
        assert alert["ts"] >= before - 5, alert  # not stamped 1970
        assert alert["ts_source"] == "agent"
        assert cloud.wait_for(lambda c: any(
            b.get("bad_input", {}).get("clock_unset", 0) >= 100 for b in c.of("status")),
            timeout=15)
        assert "clock_unset" in proc.output()
    finally:
        pub.loop_stop()
        cloud.close()
        assert proc.terminate() == 0


def test_refused_manifest_flood_is_counted_not_logged(tmp_path, key, broker,  # noqa: F811
                                                      start_agent, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    agent = start_agent(pub=key[1])
    pub = publisher(broker.port)
    try:
        # Distinct junk each time (a re-delivered identical manifest is refused silently).
        publish_all(pub, "edge/fleet/default/model/skab-ae",
                    [b"{not json %d" % i for i in range(200)])
        assert wait_until(lambda: agent.fleet is not None
                          and agent.fleet.receiver.refusals >= 200, timeout=30)
    finally:
        pub.loop_stop()
    lines = [r for r in caplog.records if "rejected" in r.getMessage()
             and r.name.startswith("agent.fleet")]
    assert 1 <= len(lines) <= 12, len(lines)  # the old receiver wrote 200 WARNING lines
