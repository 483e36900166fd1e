"""The service layer's parts in-process: sd_notify, watchdog settings, reload, rates, metrics."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import parse_config
from agent.daemon import Agent
from agent.pipeline.calibrate import Calibrator
from agent.service.health import HealthServer, check_pipeline, metrics_registry
from agent.service.notify import SystemdNotifier, watchdog_interval
from agent.service.rates import RateMeter
from agent.service.reload import LIVE_KEYS, config_changes, is_live, merge_live

from .conftest import REPO, agent_config

# -- sd_notify -------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams_to_path_and_abstract_sockets(tmp_path, abstract):
    addr = f"@edge-agent-{uuid.uuid4().hex}" if abstract else str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + addr[1:] if abstract else addr)
        srv.settimeout(5)
        n = SystemdNotifier({"NOTIFY_SOCKET": addr})
        assert n.enabled
        assert n.ready("2 streams\nok")
        assert srv.recv(4096) == b"READY=1\nSTATUS=2 streams ok"  # a newline would split a field
        assert n.watchdog()
        assert srv.recv(4096) == b"WATCHDOG=1"
        assert n.stopping("bye")
        assert srv.recv(4096) == b"STOPPING=1\nSTATUS=bye"
        n.close()
    assert n.sent == 3


def test_notifier_is_a_no_op_outside_systemd_and_survives_a_vanished_manager(tmp_path, caplog):
    n = SystemdNotifier({})
    assert not n.enabled and not n.ready("x") and n.sent == 0
    with caplog.at_level(logging.WARNING):
        odd = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not odd.enabled and "not a unix socket path" in caplog.text
    gone = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert gone.watchdog() is False  # ENOENT is counted, not raised
    assert gone.watchdog() is False
    assert gone.errors == 2


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(pid)}) == 0.5
    # Inherited from a parent: the watchdog is not ours to pet.
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


# -- reload ------------------------------------------------------------------------------


def _cfg(tmp_path, **patch):
    raw = agent_config(tmp_path, 1883)
    for key, value in patch.items():
        section, _, name = key.partition("__")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return parse_config(raw, base_dir=REPO)


def test_config_changes_and_which_are_live(tmp_path):
    old = _cfg(tmp_path)
    stream = dict(agent_config(tmp_path, 1883)["streams"][0])
    new_stream = {**stream, "window": 32, "alert": {**stream["alert"], "margin": 3.0}}
    new = _cfg(tmp_path, local__port=1884, upstream__status_interval_s=5, log_level="debug",
               streams=[new_stream, {**stream, "name": "extra"}])
    changes = config_changes(old, new)
    assert set(changes) == {"local.port", "upstream.status_interval_s", "log_level",
                            "streams[pump].window", "streams[pump].alert.margin",
                            "streams[extra] (added)"}
    assert {c for c in changes if is_live(c)} == {"upstream.status_interval_s", "log_level",
                                                  "streams[pump].alert.margin"}
    merged = merge_live(old, new)
    # Everything live was taken over; what is left differs only where a restart is needed.
    assert all(not is_live(c) for c in config_changes(merged, new))
    assert merged.local.port == 1883 and merged.streams[0].window == 16
    assert config_changes(old, old) == []


def test_every_live_key_names_a_real_option(tmp_path):
    cfg = _cfg(tmp_path)
    for key in LIVE_KEYS:
        obj = cfg
        for part in key.replace("streams[*]", "streams").split("."):
            obj = getattr(obj, part)
            if part == "streams":
                obj = obj[0]


def test_calibrator_reconfigure():
    cal = Calibrator(threshold=None, quantile=0.5, margin=1.0, smoothing=1.0)
    cal.learn_warm(np.linspace(0, 1, 11))
    cal.finish_warmup()
    assert cal.threshold == pytest.approx(0.5)  # median of the warm-up scores
    cal.reconfigure(None, quantile=0.5, margin=2.0)
    assert cal.threshold == pytest.approx(1.0)  # re-derived from the kept warm-up scores
    cal.reconfigure(0.25, quantile=0.5, margin=2.0)
    assert cal.threshold == 0.25
    fresh = Calibrator(threshold=5.0)
    fresh.reconfigure(None, quantile=0.999, margin=1.5)
    assert fresh.threshold is None  # still warming up: derived when warm-up ends


@pytest.fixture
def agent(tmp_path):
    a = Agent(_cfg(tmp_path))
    yield a
    a.outbox.close()


def test_agent_reload_applies_live_keys_and_reports_the_rest(agent, tmp_path):
    stream = dict(agent_config(tmp_path, 1883)["streams"][0])
    new = _cfg(tmp_path, local__keepalive=45, upstream__status_interval_s=7,
               streams=[{**stream, "hop": 8, "alert": {"threshold": 0.125, "consecutive": 3}}])
    restart = agent.reload(new)
    assert restart == ["local.keepalive", "streams[pump].hop"]
    st = agent.streams[0]
    assert st.threshold == 0.125 and st.episodes.consecutive == 3
    assert st.cfg.hop == 4  # not applied: the ring buffer was built for hop 4
    assert agent.cfg.local.keepalive == 30
    assert agent.uplink.cfg.upstream.status_interval_s == 7


# -- rates, health, metrics --------------------------------------------------------------


def test_rate_meter():
    now = [100.0]
    m = RateMeter(clock=lambda: now[0], min_interval_s=5)
    assert m.update({"a": 0}) == {}
    now[0] = 102
    assert m.update({"a": 50}) == {}  # too soon: no rate from 2 s
    now[0] = 110
    assert m.update({"a": 200}) == {"a": 20.0}
    now[0] = 111
    assert m.update({"a": 900}) == {"a": 20.0}  # held until the next full interval


def test_metrics_parse_and_health_endpoint_in_process(agent):
    st = agent.streams[0]
    st.samples, st.windows_scored = 123, 27
    agent.bad_input.add("json", "sensors/x", "broken")
    reg = metrics_registry(agent, lambda: check_pipeline(agent, 15.0))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    assert fams["edge_agent_samples"].type == "counter"
    assert fams["edge_agent_samples"].samples[0].value == 123
    assert fams["edge_agent_windows_scored"].samples[0].labels == {"stream": "pump"}
    assert fams["edge_agent_bad_input"].samples[0].labels == {"kind": "json"}
    assert fams["edge_agent_info"].samples[0].labels["device"] == "dev1"
    assert "edge_agent_alert_threshold" in fams  # empty until auto warm-up ends
    assert fams["edge_agent_healthy"].samples[0].value == 0.0  # never started: no threads

    server = HealthServer("127.0.0.1", 0, lambda: check_pipeline(agent, 15.0), reg)
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        assert e.value.code == 503
        assert b"inference thread is not running" in e.value.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            assert b"edge_agent_samples_total" in r.read()
    finally:
        server.stop()


def test_journal_formatter_prefixes_every_line_with_the_priority():
    from agent.cli import _JournalFormatter

    fmt = _JournalFormatter("%(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.getLogger("agent.x").makeRecord(
            "agent.x", logging.ERROR, __file__, 1, "step failed: %s", ("s1",), sys.exc_info())
    lines = fmt.format(rec).splitlines()
    assert lines[0] == "<3>agent.x: step failed: s1"
    assert len(lines) > 3 and all(x.startswith("<3>  ") for x in lines[1:])
    assert lines[-1] == "<3>  ValueError: boom"
    warn = logging.getLogger("a").makeRecord("a", logging.WARNING, __file__, 1, "w", (), None)
    assert fmt.format(warn) == "<4>a: w"


def test_service_options_are_documented_in_the_example():
    from agent import config as c

    text = (REPO / "config" / "agent.example.yaml").read_text()
    section = text[text.index("\nservice:"):text.index("\nstreams:")]
    for cls in (c.ServiceConfig, c.HealthConfig):
        for f in dataclasses.fields(cls):
            assert f"{f.name}:" in section, f"{cls.__name__}.{f.name} is not documented"
