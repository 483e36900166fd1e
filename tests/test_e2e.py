"""The real `edge-agent run` process against a real mosquitto, driven as a user would."""

import json
import signal
import subprocess
import time

import pytest

from .conftest import (
    SKAB_FIELDS,
    AgentProcess,
    agent_config,
    anomalous_rows,
    normal_rows,
    publish_all,
    publisher,
    write_config,
)


@pytest.fixture
def running_agent(tmp_path, broker, cloud):
    cfg = write_config(tmp_path, agent_config(tmp_path, broker.port))
    proc = AgentProcess(cfg)
    assert proc.wait_log("subscribed to"), proc.output()
    assert cloud.wait_for(lambda c: any(b.get("status") == "online" for b in c.of("status")))
    yield proc
    if proc.proc.poll() is None:
        proc.kill()


def test_alert_reaches_the_cloud_with_the_documented_fields(running_agent, broker, cloud, card):
    pub = publisher(broker.port)
    rows = normal_rows(card, 200)
    publish_all(pub, "sensors/pump/a", rows)
    assert cloud.wait_for(lambda c: any(
        b["streams"]["pump"]["windows"] >= 40 for b in c.of("status")), timeout=10)
    assert cloud.of("alert") == [], "normal data raised an alert"
    bad = anomalous_rows(card, 24, t0=rows[-1]["ts"] + 1)
    publish_all(pub, "sensors/pump/a", bad)
    assert cloud.wait_for(lambda c: len(c.of("alert")) >= 1), running_agent.output()
    alert = cloud.of("alert")[0]
    assert set(alert) >= {"device", "stream", "seq", "ts", "score", "threshold", "model",
                          "model_version"}
    assert alert["device"] == "dev1" and alert["stream"] == "pump"
    assert alert["model"] == "skab-ae" and alert["model_version"] == card.version
    assert alert["score"] > alert["threshold"]
    assert bad[0]["ts"] <= alert["ts"] <= bad[-1]["ts"]
    seqs = [a["seq"] for a in cloud.of("alert")]
    assert seqs == sorted(set(seqs))
    pub.loop_stop()
    assert running_agent.terminate() == 0


def test_no_alert_during_warmup_even_for_anomalies(tmp_path, broker, cloud, card):
    cfg = agent_config(tmp_path, broker.port, warmup=400, alert={"threshold": 0.001})
    proc = AgentProcess(write_config(tmp_path, cfg))
    assert proc.wait_log("subscribed to"), proc.output()
    pub = publisher(broker.port)
    publish_all(pub, "sensors/pump/x", anomalous_rows(card, 380, t0=1e9))
    assert cloud.wait_for(lambda c: any(
        b["streams"]["pump"]["samples"] >= 380 for b in c.of("status")), timeout=10)
    assert cloud.of("alert") == []
    publish_all(pub, "sensors/pump/x", normal_rows(card, 40, t0=1e9 + 400))
    assert cloud.wait_for(lambda c: len(c.of("alert")) >= 1), proc.output()
    assert proc.terminate() == 0


def test_bad_input_is_counted_and_the_agent_keeps_going(running_agent, broker, cloud, card):
    pub = publisher(broker.port)
    nan_row = json.dumps({**normal_rows(card, 1)[0], "Current": float("nan")}).encode()
    junk = [b"{not json", nan_row, b"[1,2,3]",
            json.dumps({**normal_rows(card, 1)[0], "Voltage": float("inf")}).encode(),
            json.dumps({k: "x" for k in SKAB_FIELDS}).encode(), b"\xff\xfe\x00"]
    publish_all(pub, "sensors/pump/junk", junk * 3)
    publish_all(pub, "sensors/pump/a", normal_rows(card, 100))
    assert cloud.wait_for(lambda c: any(
        b["streams"]["pump"]["samples"] == 100 and sum(b["bad_input"].values()) == 18
        for b in c.of("status")), timeout=10), cloud.of("status")[-1:]
    status = cloud.of("status")[-1]
    assert status["bad_input"] == {"undecodable": 6, "wrong_fields": 6, "non_finite": 6}
    out = running_agent.output()
    # Logged once per kind and topic, not once per message.
    assert out.count("dropped undecodable input on sensors/pump/junk") == 1
    assert out.count("dropped non_finite input on sensors/pump/junk") == 1
    assert running_agent.terminate() == 0


def test_frames_csv_and_float_streams(tmp_path, broker, cloud, card):
    cfg = agent_config(tmp_path, broker.port)
    cfg["streams"] = [
        {**cfg["streams"][0], "name": "framed", "topic": "f/pump"},
        {**cfg["streams"][0], "name": "csv", "topic": "c/pump", "format": "csv"},
    ]
    proc = AgentProcess(write_config(tmp_path, cfg))
    assert proc.wait_log("subscribed to"), proc.output()
    pub = publisher(broker.port)
    rows = normal_rows(card, 128)
    frames = [{"ts": [r["ts"] for r in rows[i:i + 32]],
               **{f: [r[f] for r in rows[i:i + 32]] for f in SKAB_FIELDS}}
              for i in range(0, 128, 32)]
    publish_all(pub, "f/pump", frames)
    lines = [",".join(str(r[k]) for k in ["ts", *SKAB_FIELDS]) for r in rows]
    publish_all(pub, "c/pump", ["\n".join(lines[:64]), *lines[64:]])
    assert cloud.wait_for(lambda c: any(
        b["streams"]["framed"]["samples"] == 128 and b["streams"]["csv"]["samples"] == 128
        for b in c.of("status")), timeout=10), cloud.of("status")[-1:]
    assert proc.terminate() == 0


def test_sigint_and_sigterm_stop_cleanly_and_publish_offline(tmp_path, broker, cloud):
    proc = AgentProcess(write_config(tmp_path, agent_config(tmp_path, broker.port)))
    assert proc.wait_log("subscribed to"), proc.output()
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(timeout=20) == 0
    assert cloud.wait_for(lambda c: c.of("status") and c.of("status")[-1]["status"] == "offline")
    assert "edge-agent stopped" in proc.output()


def test_seq_survives_restart(tmp_path, broker, cloud, card):
    cfg = write_config(tmp_path, agent_config(tmp_path, broker.port, warmup=32))
    last = 0
    for run in range(2):
        before = len(cloud.of("alert"))
        proc = AgentProcess(cfg)
        assert proc.wait_log("subscribed to"), proc.output()
        pub = publisher(broker.port)
        t0 = 2e9 + run * 1000
        publish_all(pub, "sensors/pump/a", normal_rows(card, 160, t0=t0)
                    + anomalous_rows(card, 8, t0=t0 + 160))
        assert cloud.wait_for(lambda c, n=before: len(c.of("alert")) > n), proc.output()
        pub.loop_stop()
        assert proc.terminate() == 0  # drains the outbox before going offline
        seqs = [a["seq"] for a in cloud.of("alert")]
        assert seqs == sorted(set(seqs))
        assert seqs[before] > last
        last = seqs[-1]


def test_unreachable_broker_does_not_crash_and_sigterm_still_exits_zero(tmp_path):
    from agent.broker import free_port

    port = free_port()  # nothing listens here
    proc = AgentProcess(write_config(tmp_path, agent_config(tmp_path, port)))
    assert proc.wait_log("started"), proc.output()
    time.sleep(1.5)  # let it fail to connect at least once
    assert proc.proc.poll() is None
    assert proc.terminate() == 0


def test_run_with_broken_config_exits_78(tmp_path):
    import sys
    from pathlib import Path

    p = tmp_path / "a.yaml"
    p.write_text("device_id: d\nstreams: 3\n")
    exe = Path(sys.executable).parent / "edge-agent"
    r = subprocess.run([str(exe), "run", "--config", str(p)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 78  # EX_CONFIG: the unit does not restart on it
    assert "streams: must be a list" in r.stderr


def test_stale_subscription_topic_is_counted_as_unknown(tmp_path, broker, cloud, card):
    # With qos 1 the local session is persistent, so after a config change the
    # broker still delivers the old filter's messages: they must be counted, not crash.
    cfg = agent_config(tmp_path, broker.port, topic="old/pump")
    cfg["local"]["qos"] = 1
    proc = AgentProcess(write_config(tmp_path, cfg))
    assert proc.wait_log("subscribed to"), proc.output()
    assert proc.terminate() == 0
    pub = publisher(broker.port)
    publish_all(pub, "old/pump", normal_rows(card, 3))  # queued in the session
    cfg["streams"][0]["topic"] = "new/pump"
    proc = AgentProcess(write_config(tmp_path, cfg))
    assert cloud.wait_for(lambda c: any(
        b.get("bad_input", {}).get("unknown_topic") == 3 for b in c.of("status")), timeout=10)
    assert proc.wait_log("dropped unknown_topic input on old/pump")
    assert proc.terminate() == 0


def test_uplink_subscriptions_receive_cloud_messages_and_survive_reconnect(tmp_path, broker):
    import threading

    import paho.mqtt.publish as publish

    from agent.config import parse_config
    from agent.uplink.outbox import Outbox
    from agent.uplink.uplink import Uplink

    cfg = parse_config(agent_config(tmp_path, broker.port))
    ob = Outbox(tmp_path / "o.db")
    up = Uplink(cfg, ob, status=dict)
    got: list[bytes] = []
    event = threading.Event()

    def on_feedback(msg):
        got.append(msg.payload)
        event.set()
        raise RuntimeError("a callback bug must not kill paho's thread")

    up.subscribe("edge/dev1/feedback/+", 1, on_feedback)
    up.start()
    try:
        assert up.connected.wait(10)
        for attempt in range(2):
            event.clear()
            deadline = time.monotonic() + 10
            while not event.is_set() and time.monotonic() < deadline:
                publish.single("edge/dev1/feedback/pump", f"m{attempt}", qos=1,
                               hostname="127.0.0.1", port=broker.port)
                event.wait(0.5)
            assert event.is_set(), f"no message on attempt {attempt}"
            if attempt == 0:
                connects = up.connects
                broker.restart()  # no persistence: the subscription must be renewed
                deadline = time.monotonic() + 40
                while up.connects == connects and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert up.connects > connects
        assert up.callback_errors >= 2
    finally:
        up.stop(0)
        ob.close()


def test_summaries_carry_exact_statistics(tmp_path, broker, cloud, card):
    import numpy as np

    cfg = agent_config(tmp_path, broker.port, summary_s=0.5, warmup=32)
    proc = AgentProcess(write_config(tmp_path, cfg))
    assert proc.wait_log("subscribed to"), proc.output()
    pub = publisher(broker.port)
    rows = normal_rows(card, 200, seed=3)
    publish_all(pub, "sensors/pump/a", rows)
    assert cloud.wait_for(lambda c: sum(s["count"] for s in c.of("summary")) >= 200,
                          timeout=15), cloud.of("summary")
    sums = cloud.of("summary")
    assert sum(s["count"] for s in sums) == 200
    vals = np.array([[r[f] for f in SKAB_FIELDS] for r in rows])
    f = SKAB_FIELDS[2]
    total_mean = sum(s["fields"][f]["mean"] * s["count"] for s in sums) / 200
    assert total_mean == pytest.approx(vals[:, 2].mean(), rel=1e-5)
    assert min(s["fields"][f]["min"] for s in sums) == pytest.approx(vals[:, 2].min(), rel=1e-5)
    assert max(s["fields"][f]["max"] for s in sums) == pytest.approx(vals[:, 2].max(), rel=1e-5)
    one = sums[0]
    assert set(one) >= {"device", "stream", "seq", "ts", "start", "end", "count", "fields",
                        "score", "alerts", "windows", "model", "model_version"}
    assert set(one["fields"][f]) == {"count", "mean", "min", "max", "std", "p95"}
    assert one["end"] - one["start"] == pytest.approx(0.5)
    assert all(s["alerts"] == 0 for s in sums)
    status = cloud.of("status")[-1]
    assert {"backlog", "backlog_bytes", "evicted", "expired", "uplink"} <= set(status)
    assert proc.terminate() == 0


def test_outbox_cli(tmp_path):
    import sys
    from pathlib import Path

    from agent.broker import free_port
    from agent.uplink.outbox import Outbox

    cfg = agent_config(tmp_path, free_port())
    path = write_config(tmp_path, cfg)
    ob = Outbox(tmp_path / "state" / "outbox.db")
    for kind in ["alert", "summary", "summary"]:
        ob.put(kind, "pump", f"edge/dev1/{kind}/pump", lambda seq: {"seq": seq})
    ob.close()
    exe = str(Path(sys.executable).parent / "edge-agent")
    r = subprocess.run([exe, "outbox", "stats", "--config", str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["by_kind"] == {"alert": 1, "summary": 2}
    r = subprocess.run([exe, "outbox", "peek", "--config", str(path), "--kind", "summary"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("edge/dev1/summary/pump") == 2
    r = subprocess.run([exe, "outbox", "purge", "--config", str(path), "--kind", "summary"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "--yes" in r.stderr
    r = subprocess.run([exe, "outbox", "purge", "--config", str(path), "--kind", "summary",
                        "--yes"], capture_output=True, text=True)
    assert r.returncode == 0 and "purged 2" in r.stdout
    r = subprocess.run([exe, "outbox", "stats", "--config", str(path)], capture_output=True,
                       text=True)
    stats = json.loads(r.stdout)
    assert stats["rows"] == 1 and stats["evicted"] == {"summary": 2}


def test_feedback_from_the_cloud_and_state_across_a_restart(tmp_path, broker, cloud, card):
    """Labels arrive over the cloud broker; SIGTERM checkpoints; a restart restores."""
    # Radius 3: windows of this synthetic fault differ by up to ~1 z-unit RMS (noise of
    # 1 z per sample); normal windows are ~9 away.
    raw = agent_config(tmp_path, broker.port, adapt={"drift": "none", "feedback_radius": 3.0})
    cfg = write_config(tmp_path, raw)
    proc = AgentProcess(cfg)
    assert proc.wait_log("subscribed to"), proc.output()
    assert cloud.wait_for(lambda c: any(b.get("status") == "online" for b in c.of("status")))
    pub = publisher(broker.port)
    rows = normal_rows(card, 200)
    publish_all(pub, "sensors/pump/a", rows)
    fault = [{**r, "Accelerometer1RMS": r["Accelerometer1RMS"] + 8 * float(card.std[0]),
              "Accelerometer2RMS": r["Accelerometer2RMS"] + 8 * float(card.std[1])}
             for r in normal_rows(card, 24, seed=5, t0=rows[-1]["ts"] + 1)]
    publish_all(pub, "sensors/pump/a", fault)
    assert cloud.wait_for(lambda c: len(c.of("alert")) >= 1), proc.output()
    # Every window scored (53 of 224 samples, less 5 that only learnt the scaling), so the
    # label finds its window.
    assert cloud.wait_for(lambda c: any(
        b["streams"]["pump"]["windows"] >= 48 for b in c.of("status")), timeout=10)
    # The operator confirms the steady fault is normal for this pump.
    cloud.client.publish("edge/dev1/feedback/pump",
                         json.dumps({"ts": fault[-1]["ts"], "label": "normal"}), qos=1)
    assert cloud.wait_for(lambda c: any(
        b["streams"]["pump"]["labels"].get("normal") == 1 for b in c.of("status"))), \
        proc.output()
    assert proc.terminate() == 0
    assert (tmp_path / "state" / "adapt" / "pump.state").is_file()

    n_alerts = len(cloud.of("alert"))
    proc = AgentProcess(cfg)
    assert proc.wait_log("adaptation state of pump restored"), proc.output()
    assert proc.wait_log("subscribed to"), proc.output()
    t0 = fault[-1]["ts"] + 1000
    again = [{**r, "ts": t0 + i} for i, r in enumerate(fault * 3)]
    publish_all(pub, "sensors/pump/a", again)
    # No warm-up after the restart, and the labelled fault no longer alerts once the
    # windows are all fault (the first 15 straddle the gap between recordings).
    assert cloud.wait_for(lambda c: any(
        b["streams"]["pump"]["samples"] >= 72 for b in c.of("status")), timeout=10)
    late = [a for a in cloud.of("alert")[n_alerts:] if a["ts"] >= t0 + 16]
    assert late == [], [(a["ts"] - t0, a["score"], a["threshold"]) for a in late]
    pub.loop_stop()
    assert proc.terminate() == 0


def test_extreme_reading_alerts_with_a_finite_score(running_agent, broker, cloud, card):
    # 1e37 is a valid float32 reading; squared in the score it would overflow to inf.
    pub = publisher(broker.port)
    rows = normal_rows(card, 100)
    huge = [{**r, "Current": 1e37} for r in normal_rows(card, 8, t0=rows[-1]["ts"] + 1)]
    publish_all(pub, "sensors/pump/a", rows + huge)
    assert cloud.wait_for(lambda c: len(c.of("alert")) >= 1), running_agent.output()
    alert = cloud.of("alert")[0]
    assert alert["score"] > alert["threshold"]
    assert cloud.wait_for(lambda c: any(
        b["streams"]["pump"]["windows"] >= 20 for b in c.of("status")))
    status = cloud.of("status")[-1]
    assert status["callback_errors"] == 0
    assert "inference step failed" not in running_agent.output()
    pub.loop_stop()
    assert running_agent.terminate() == 0
