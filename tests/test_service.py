"""Running as a service: sd_notify, watchdog, SIGHUP reload, health endpoint, journald logs.

The process tests run the real ``edge-agent run`` against a real mosquitto with
``NOTIFY_SOCKET`` pointing at a datagram socket the test opens, the way systemd
starts a ``Type=notify`` service. systemd itself (as PID 1) cannot run here, so
the test plays its part: it reads the notifications and sends the signals.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.broker import LocalBroker, free_port

from .conftest import (
    TESTS,
    AgentProcess,
    agent_config,
    anomalous_rows,
    normal_rows,
    publish_all,
    publisher,
    write_config,
)


class NotifySocket:
    """The manager's end of sd_notify: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, list[str]]] = []

    def _drain(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        self.messages.append((time.monotonic(), data.decode().split("\n")))

    def drain_queued(self) -> None:
        """Read whatever has already been sent and is waiting in the socket."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode().split("\n")))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def lines(self) -> list[str]:
        return [line for _, msg in self.messages for line in msg]

    def wait_for(self, line: str, timeout: float = 15.0, after: int = 0) -> bool:
        """True once a line starting with ``line`` arrives in message ``after`` or later."""
        def seen() -> bool:
            return any(x.startswith(line) for _, msg in self.messages[after:] for x in msg)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if seen():
                return True
            self._drain(min(0.2, max(0.01, deadline - time.monotonic())))
        return seen()

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._drain(max(0.01, deadline - time.monotonic()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_sock(tmp_path):
    s = NotifySocket(str(tmp_path / "notify.sock"))
    yield s
    s.close()


def service_env(notify: NotifySocket, watchdog_s: float = 1.0, **extra: str) -> dict[str, str]:
    # INVOCATION_ID is what systemd sets for every unit; the CLI then logs for journald.
    return {"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": str(int(watchdog_s * 1e6)),
            "INVOCATION_ID": uuid.uuid4().hex, **extra}


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# -- the lifecycle, as systemd sees it -------------------------------------------------


def test_ready_only_after_both_brokers_then_watchdog_status_stopping(tmp_path):
    """READY=1 waits for the brokers (here: not running at first); then pings; STOPPING=1."""
    port = free_port()
    broker = LocalBroker((TESTS / "mosquitto.conf").read_text(), port=port,
                         workdir=tmp_path / "broker")
    cfg = agent_config(tmp_path, port)
    cfg["service"] = {"ready_timeout_s": 0}  # strict: wait for both brokers however long
    # An abstract-namespace address, as systemd uses when /run is not writable.
    notify = NotifySocket(f"@edge-agent-test-{uuid.uuid4().hex}")
    proc = AgentProcess(write_config(tmp_path, cfg), env=service_env(notify))
    try:
        assert proc.wait_log("started: device dev1"), proc.output()
        notify.collect(1.5)  # models are loaded, the brokers are not there
        assert "READY=1" not in notify.lines()
        broker.start()
        assert notify.wait_for("READY=1", timeout=20), (notify.lines(), proc.output())
        out = proc.output()
        assert "subscribed to" in out and "upstream connected" in out
        n_ready = next(i for i, (_, m) in enumerate(notify.messages) if "READY=1" in m)
        assert any(x.startswith("STATUS=1 stream(s)") for x in notify.messages[n_ready][1])
        assert notify.wait_for("WATCHDOG=1", after=n_ready + 1)
        notify.collect(1.6)  # WATCHDOG_USEC=1 s: a ping every 0.5 s
        t_term = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING=1", timeout=20)
        assert proc.terminate() == 0
        assert time.monotonic() - t_term < 45  # the unit's TimeoutStopSec
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        broker.close()
        notify.close()
    kinds = [line.split("=")[0] for line in notify.lines() if not line.startswith("STATUS=")]
    first_ping = kinds.index("WATCHDOG")
    assert kinds.index("READY") < first_ping
    assert kinds.count("WATCHDOG") >= 3
    assert kinds[-1] == "STOPPING" and "WATCHDOG" not in kinds[kinds.index("STOPPING"):]
    # journald form: a <priority> prefix, the logger name, no timestamp of our own.
    lines = [x for x in proc.output().splitlines() if x.strip()]
    assert any(x.startswith("<6>agent.daemon: edge-agent") for x in lines), lines[:5]
    # LiteRT's C++ runtime writes its own "INFO: Created ... XNNPACK delegate" line
    # straight to stderr; journald files it at its default priority, info.
    unprefixed = [x for x in lines if not re.match(r"<[0-7]>", x)]
    assert all(x.startswith("INFO: Created TensorFlow Lite") for x in unprefixed), unprefixed
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", x) for x in lines)


@pytest.fixture
def wedgeable_agent(tmp_path, broker, cloud, notify_sock):
    health_port = free_port()
    cfg = agent_config(tmp_path, broker.port)
    cfg["service"] = {"stall_after_s": 2.0, "health": {"port": health_port}}
    wedge = tmp_path / "wedge"
    proc = AgentProcess(write_config(tmp_path, cfg),
                        env=service_env(notify_sock, watchdog_s=0.5,
                                        EDGE_AGENT_TEST_WEDGE_FILE=str(wedge)))
    yield proc, wedge, health_port
    if proc.proc.poll() is None:
        proc.kill()


def test_watchdog_pings_stop_when_the_pipeline_is_wedged(wedgeable_agent, notify_sock, broker,
                                                         card):
    proc, wedge, health_port = wedgeable_agent
    assert notify_sock.wait_for("READY=1"), proc.output()
    assert notify_sock.wait_for("WATCHDOG=1", after=len(notify_sock.messages))
    code, body = http_get(health_port, "/healthz")
    assert code == 200, body
    assert json.loads(body)["status"] == "ok"

    before = len(proc.output())
    wedge.touch()  # the inference thread blocks forever on its next step
    pub = publisher(broker.port)
    publish_all(pub, "sensors/pump/a", normal_rows(card, 100))  # data keeps arriving
    deadline = time.monotonic() + 15
    while "pipeline wedged" not in proc.output()[before:] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pipeline wedged: no inference step" in proc.output()[before:], proc.output()
    notify_sock.drain_queued()  # pings sent before the wedge was noticed
    mark = len(notify_sock.messages)
    notify_sock.collect(1.5)  # three watchdog periods
    after = [line for _, m in notify_sock.messages[mark:] for line in m]
    assert "WATCHDOG=1" not in after, after
    code, body = http_get(health_port, "/healthz")
    assert code == 503
    assert any("no inference step" in p for p in json.loads(body)["problems"])
    assert notify_sock.wait_for("STATUS=WEDGED", timeout=10)
    assert proc.proc.poll() is None  # systemd, not the agent, decides to restart it
    pub.loop_stop()
    # What systemd does when the watchdog times out (WatchdogSignal=SIGABRT): the
    # journal then shows where every thread was, the stuck one included.
    proc.proc.send_signal(signal.SIGABRT)
    assert proc.proc.wait(timeout=10) == -signal.SIGABRT
    out = proc.output()
    assert "Fatal Python error: Aborted" in out
    assert re.search(r'File ".*agent/service/service\.py", line \d+ in hook', out), out[-3000:]


def test_no_watchdog_pings_without_watchdog_usec_and_no_notify_without_socket(
        tmp_path, broker, cloud, notify_sock):
    """Outside systemd nothing is sent; with NOTIFY_SOCKET but no watchdog, no pings."""
    proc = AgentProcess(write_config(tmp_path, agent_config(tmp_path, broker.port)),
                        env={"NOTIFY_SOCKET": notify_sock.env_value})
    try:
        assert notify_sock.wait_for("READY=1"), proc.output()
        notify_sock.collect(1.0)
        assert "WATCHDOG=1" not in notify_sock.lines()
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    # Not under systemd: the human log format, with timestamps.
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO", proc.output(), re.M)


# -- SIGHUP ----------------------------------------------------------------------------


def _status(cloud, pred):
    return cloud.wait_for(lambda c: any(pred(b) for b in c.of("status")), timeout=15)


def test_sighup_applies_a_new_threshold_without_restart(tmp_path, broker, cloud, card,
                                                       notify_sock):
    health_port = free_port()
    cfg = agent_config(tmp_path, broker.port, alert={"threshold": 1e9, "cooldown_s": 0})
    cfg["service"] = {"health": {"port": health_port}}
    path = write_config(tmp_path, cfg)
    proc = AgentProcess(path, env=service_env(notify_sock, watchdog_s=5))
    try:
        assert notify_sock.wait_for("READY=1"), proc.output()
        pid = proc.proc.pid
        pub = publisher(broker.port)
        rows = normal_rows(card, 200)
        publish_all(pub, "sensors/pump/a", rows)
        bad = anomalous_rows(card, 24, t0=rows[-1]["ts"] + 1)
        publish_all(pub, "sensors/pump/a", bad)
        assert _status(cloud, lambda b: b["streams"]["pump"]["samples"] == 224)
        assert cloud.of("alert") == []  # 1e9 is out of reach

        # A bad config is refused and the agent carries on with the old one.
        path.write_text("device_id: [unclosed\n")
        mark = len(notify_sock.messages)
        proc.proc.send_signal(signal.SIGHUP)
        assert proc.wait_log("does not validate; still running the previous config")
        assert notify_sock.wait_for("READY=1", after=mark)

        # auto = quantile(warm-up scores) x margin, from the scores kept since warm-up;
        # a broker setting changes too, which needs a restart and must say so.
        cfg["streams"][0]["alert"] = {"threshold": "auto", "quantile": 0.99, "margin": 2.0,
                                      "cooldown_s": 0}
        cfg["local"]["keepalive"] = 45
        cfg["log_level"] = "debug"
        path.write_text(yaml.safe_dump(cfg))
        mark = len(notify_sock.messages)
        proc.proc.send_signal(signal.SIGHUP)
        assert notify_sock.wait_for("RELOADING=1", after=mark), proc.output()
        assert notify_sock.wait_for("READY=1", after=mark)
        assert proc.wait_log("reload: streams[pump].alert.threshold applied"), proc.output()
        out = proc.output()
        assert re.search(r"need a restart .* NOT applied: local\.keepalive$", out, re.M), out
        assert _status(cloud, lambda b: b["streams"]["pump"]["threshold"] < 1e9)

        publish_all(pub, "sensors/pump/a", anomalous_rows(card, 24, t0=bad[-1]["ts"] + 1))
        assert cloud.wait_for(lambda c: len(c.of("alert")) >= 1), proc.output()
        alert = cloud.of("alert")[0]
        assert alert["threshold"] < 1e9 and alert["score"] > alert["threshold"]
        assert proc.proc.pid == pid and proc.proc.poll() is None
        assert proc.output().count("started: device dev1") == 1
        assert _status(cloud, lambda b: b["streams"]["pump"]["samples"] == 248)

        assert "<7>" not in proc.output()
        code, text = http_get(health_port, "/metrics")
        # log_level: debug was applied live: the request is logged at debug priority.
        want = "<7>agent.service.health: health endpoint: \"GET /metrics"
        assert proc.wait_log(want), proc.output()
        assert code == 200
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        alerts = {s.labels["stream"]: s.value for s in fams["edge_agent_alerts"].samples
                  if s.name == "edge_agent_alerts_total"}
        assert alerts["pump"] >= 1
        thr = fams["edge_agent_alert_threshold"].samples[0]
        assert thr.labels == {"stream": "pump"} and thr.value == pytest.approx(alert["threshold"],
                                                                               rel=1e-4)
        samples = fams["edge_agent_samples"].samples[0]
        assert samples.value == 248
        assert fams["edge_agent_healthy"].samples[0].value == 1.0
        assert {s.labels["broker"]: s.value
                for s in fams["edge_agent_broker_connected"].samples} == {"local": 1.0,
                                                                          "upstream": 1.0}
        assert fams["process_resident_memory_bytes"].samples[0].value > 10e6
        assert http_get(health_port, "/nope")[0] == 404
        pub.loop_stop()
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()


def test_status_message_has_per_stream_rates(tmp_path, broker, cloud, card):
    cfg = agent_config(tmp_path, broker.port)
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        pub = publisher(broker.port)
        publish_all(pub, "sensors/pump/a", normal_rows(card, 300))
        # Rates cover at least 5 s (agent.rates.MIN_INTERVAL_S) between status refreshes.
        assert _status(cloud, lambda b: b["streams"]["pump"]["rate"]["samples_per_s"] > 0)
        rate = next(b["streams"]["pump"]["rate"] for b in reversed(cloud.of("status"))
                    if b["streams"]["pump"]["rate"]["samples_per_s"] > 0)
        assert set(rate) == {"messages_per_s", "samples_per_s", "windows_per_s"}
        assert 0 < rate["samples_per_s"] <= 300
        pub.loop_stop()
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()


def test_health_port_in_use_is_a_clear_start_error(tmp_path, broker):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = agent_config(tmp_path, broker.port)
        cfg["service"] = {"health": {"port": busy.getsockname()[1]}}
        proc = AgentProcess(write_config(tmp_path, cfg))
        rc = proc.proc.wait(timeout=30)
        proc._log_f.close()
    # Issue 12: a configuration/environment problem exits 78 (systemd does not restart
    # it every 5 s) with one line naming the key and the value.
    assert rc == 78
    port = cfg["service"]["health"]["port"]
    assert f"service.health.port: 127.0.0.1:{port} is already in use" in proc.output()


def test_bad_config_exits_78_so_systemd_does_not_restart_it(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("device_id: d1\nservice: {stall_after_s: 0, health: {port: 70000}}\nstreams: []\n")
    proc = AgentProcess(p)
    rc = proc.proc.wait(timeout=30)
    proc._log_f.close()
    assert rc == 78
    out = proc.output()
    assert "service.stall_after_s: must be > 0" in out
    assert "service.health.port: must be <= 65535" in out
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "edge-agent.service").read_text()
    assert "RestartPreventExitStatus=78" in unit

