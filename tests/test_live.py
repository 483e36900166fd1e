"""The live view: /events against a real agent and mosquitto, bounds, auth, config checks."""

from __future__ import annotations

import base64
import itertools
import urllib.error
import urllib.request

import pytest

from agent.config import ConfigError, parse_config
from agent.daemon import Agent
from agent.service.health import HealthServer, check_pipeline, metrics_registry
from agent.service.live import LiveView

from .conftest import anomalous_rows, normal_rows, publish_all, publisher, wait_until
from .live_support import SseReader, live_config


@pytest.fixture
def live_agent(tmp_path, broker):
    """An in-process agent with its health server and live view on an ephemeral port."""
    made = []

    def make(token=None, **live):
        raw = live_config(tmp_path, broker.port, 0, **live)
        if token:
            raw["service"]["health"]["token"] = token
        cfg = parse_config(raw)
        agent = Agent(cfg)
        view = LiveView(agent, cfg.service.live)
        health = lambda: check_pipeline(agent, 15)  # noqa: E731
        server = HealthServer("127.0.0.1", 0, health, metrics_registry(agent, health),
                              live=view, token=token)
        agent.start()
        server.start()
        assert agent.wait_connected(10)
        made.append((agent, server))
        return agent, view, f"http://127.0.0.1:{server.port}"

    yield make
    for agent, server in made:
        server.stop()
        agent.stop(drain_timeout=0)


def _points(events):
    return sum(len(d["streams"]["pump"].get("points", {}).get("ts", [])) for d in events)


def test_snapshot_then_coalesced_updates_follow_the_stream(live_agent, broker, card):
    _, view, base = live_agent()
    pub = publisher(broker.port)
    rows = normal_rows(card, 200)
    publish_all(pub, "sensors/pump/a", rows)
    # The last window is scored and a tick has closed its point.
    assert wait_until(lambda: view._hist["pump"].points
                      and view._hist["pump"].points[-1][0] == rows[-1]["ts"], timeout=15)
    sse = SseReader(base + "/events")
    assert sse.wait_for(lambda s: s.of("snapshot")), sse.lines
    assert sse.lines[0] == "retry: 2000"
    snap = sse.of("snapshot")[0]
    assert snap["device"] == "dev1" and snap["local_connected"] and snap["upstream_connected"]
    pump = snap["streams"]["pump"]
    assert pump["model"] == "skab-ae" and pump["state"] in ("normal", "warming_up")
    assert pump["points"]["ts"], "the snapshot carries the recent history"
    assert pump["points"]["ts"][-1] == rows[-1]["ts"]
    # A fault: the page hears of the episode and sees the state turn.
    bad = anomalous_rows(card, 40, t0=rows[-1]["ts"] + 1)
    publish_all(pub, "sensors/pump/a", bad)
    assert sse.wait_for(lambda s: any(u["streams"]["pump"].get("state") == "anomaly"
                                      for u in s.of("update"))), sse.events[-3:]
    assert sse.wait_for(lambda s: any(1 in u["streams"]["pump"].get("points", {})
                                      .get("episode", []) for u in s.of("update")))
    last = max(ts for u in sse.of("update")
               for ts in u["streams"]["pump"].get("points", {}).get("ts", []))
    assert bad[0]["ts"] <= last <= bad[-1]["ts"]
    # Coalesced: one frame per tick at most, whatever the window rate.
    ups = sse.times[1:]
    assert all(b - a > 0.5 / view.cfg.rate_hz for a, b in itertools.pairwise(ups))
    sse.close()
    pub.loop_stop()


def test_history_is_bounded(live_agent, broker, card):
    _, view, base = live_agent(points=20, rate_hz=20)
    pub = publisher(broker.port)
    rows = normal_rows(card, 64 + 30 * 8)
    publish_all(pub, "sensors/pump/a", rows[:64])
    hist = view._hist["pump"].points
    sse = SseReader(base + "/events")
    for i in range(30):  # a chunk, then a tick: one more point each time, up to the cap
        before = list(hist)
        publish_all(pub, "sensors/pump/a", rows[64 + 8 * i: 72 + 8 * i])
        assert sse.wait_for(lambda s, b=before: list(hist) != b, timeout=5), i
    assert len(hist) == 20
    assert hist[-1][0] == rows[-1]["ts"]
    sse.close()
    late = SseReader(base + "/events")
    assert late.wait_for(lambda s: s.of("snapshot"))
    assert len(late.of("snapshot")[0]["streams"]["pump"]["points"]["ts"]) == 20
    late.close()
    pub.loop_stop()


def test_client_cap_and_keepalive(live_agent):
    _, view, base = live_agent(max_clients=1, keepalive_s=0.3)
    first = SseReader(base + "/events")
    assert first.wait_for(lambda s: s.of("snapshot"))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/events", timeout=5)
    assert e.value.code == 503 and e.value.headers["Retry-After"]
    assert view.refused == 1
    assert first.wait_for(lambda s: s.lines.count(": keep-alive") >= 2, timeout=5)
    first.close()
    # The slot frees when the page goes: the next one gets in.
    second = None
    for _ in range(50):
        try:
            second = SseReader(base + "/events")
            break
        except urllib.error.HTTPError:
            first.wait_for(lambda s: False, timeout=0.1)
    assert second is not None and second.wait_for(lambda s: s.of("snapshot"))
    second.close()


def test_token_guards_the_page_and_events_only(live_agent):
    token = "s3cret-token-0123456789"
    _, _, base = live_agent(token=token)
    for path in ("/", "/events"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=5)
        assert e.value.code == 401 and "Basic" in e.value.headers["WWW-Authenticate"]
    basic = base64.b64encode(f"anyone:{token}".encode()).decode()
    assert urllib.request.urlopen(urllib.request.Request(
        base + "/", headers={"Authorization": f"Basic {basic}"}), timeout=5).status == 200
    assert urllib.request.urlopen(base + f"/?token={token}", timeout=5).status == 200
    sse = SseReader(base + "/events", headers={"Authorization": f"Bearer {token}"})
    assert sse.wait_for(lambda s: s.of("snapshot"))
    sse.close()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(base + "/?token=wrong-token-0123456789", timeout=5)
    # Scrapers and probes keep working as before.
    assert urllib.request.urlopen(base + "/metrics", timeout=5).status == 200
    assert urllib.request.urlopen(base + "/static/uPlot.iife.min.js", timeout=5).status == 200


def test_beyond_loopback_needs_a_token(tmp_path):
    raw = live_config(tmp_path, 1883, 8080)
    raw["service"]["health"]["host"] = "0.0.0.0"
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert any(p.startswith("service.health.host: the live page") for p in e.value.problems)
    raw["service"]["health"]["token"] = "short"
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert any(p.startswith("service.health.token: use at least 16") for p in e.value.problems)
    raw["service"]["health"]["token"] = "a-long-enough-secret"
    assert parse_config(raw).service.health.token == "a-long-enough-secret"
    raw["service"]["health"]["token"] = None
    raw["service"]["live"] = {"enabled": False}
    assert not parse_config(raw).service.live.enabled  # /metrics only: as before
    for host in ("127.0.0.1", "localhost", "::1"):
        raw = live_config(tmp_path, 1883, 8080)
        raw["service"]["health"]["host"] = host
        assert parse_config(raw).service.health.host == host


def test_a_closed_page_frees_its_slot_at_once(live_agent):
    _, view, base = live_agent(max_clients=1, keepalive_s=60)
    first = SseReader(base + "/events")
    assert first.wait_for(lambda s: s.of("snapshot"))
    first.close()
    # No write fails for a minute (no data, keep-alive 60 s): the hang-up itself is seen.
    assert wait_until(lambda: view.clients == 0, timeout=5)
    second = SseReader(base + "/events")
    assert second.wait_for(lambda s: s.of("snapshot"))
    second.close()
