"""The cloud connection over TLS with a client certificate, with a password, and in 3.1.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import LocalBroker

from .conftest import (
    AgentProcess,
    Cloud,
    agent_config,
    anomalous_rows,
    normal_rows,
    publish_all,
    publisher,
    write_config,
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=edge-agent test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                 f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)
    for f in d.iterdir():
        f.chmod(0o644)  # mosquitto may read them as another user
    return d


def _cloud(port: int, **tls: Any) -> tuple[mqtt.Client, list[dict[str, Any]], threading.Event]:
    got: list[dict[str, Any]] = []
    alert = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cloud-sec")
    if tls:
        c.tls_set(**tls)

    def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(json.loads(msg.payload))
        if "/alert/" in msg.topic:
            alert.set()

    c.on_message = on_message
    return c, got, alert


def _fire_alert(local: LocalBroker, card: Any) -> None:
    pub = publisher(local.port)
    publish_all(pub, "sensors/pump/a", normal_rows(card, 48, t0=2e9)
                + anomalous_rows(card, 8, t0=2e9 + 48))
    pub.loop_stop()


def test_alert_over_tls_with_client_certificate(tmp_path, broker, pki, card):
    conf = (f"listener {{port}} 127.0.0.1\nallow_anonymous true\n"
            f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\n"
            f"keyfile {pki / 'server.key'}\nrequire_certificate true\n")
    cloud_broker = LocalBroker(conf, workdir=tmp_path / "tls").start()
    c, _, alert = _cloud(cloud_broker.port, ca_certs=str(pki / "ca.pem"),
                           certfile=str(pki / "client.pem"), keyfile=str(pki / "client.key"))
    c.connect("127.0.0.1", cloud_broker.port)
    c.subscribe("edge/#", qos=1)
    c.loop_start()
    cfg = agent_config(tmp_path, broker.port, warmup=32)
    cfg["upstream"].update(port=cloud_broker.port, tls={
        "ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"),
        "key_file": str(pki / "client.key")})
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("upstream connected"), proc.output()
        _fire_alert(broker, card)
        assert alert.wait(15), proc.output()
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        c.loop_stop()
        cloud_broker.close()


def test_tls_without_client_certificate_is_refused_and_retried(tmp_path, broker, pki):
    conf = (f"listener {{port}} 127.0.0.1\nallow_anonymous true\n"
            f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\n"
            f"keyfile {pki / 'server.key'}\nrequire_certificate true\n")
    cloud_broker = LocalBroker(conf, workdir=tmp_path / "tls").start()
    cfg = agent_config(tmp_path, broker.port)
    cfg["upstream"].update(port=cloud_broker.port, tls={"ca_file": str(pki / "ca.pem")},
                           reconnect_min_s=0.2, reconnect_max_s=0.5)
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        # The handshake fails; the agent keeps running and keeps trying.
        assert not proc.wait_log("upstream connected", timeout=3)
        assert proc.proc.poll() is None
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        cloud_broker.close()


def test_password_auth_and_mqtt_311(tmp_path, broker, card):
    pw = tmp_path / "passwd"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "dev1", "s3cret"], check=True)
    pw.chmod(0o644)
    conf = f"listener {{port}} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n"
    cloud_broker = LocalBroker(conf, workdir=tmp_path / "pw").start()
    c, got, alert = _cloud(cloud_broker.port)
    c.username_pw_set("dev1", "s3cret")
    c.connect("127.0.0.1", cloud_broker.port)
    c.subscribe("edge/#", qos=1)
    c.loop_start()
    cfg = agent_config(tmp_path, broker.port, warmup=32)
    cfg["upstream"].update(port=cloud_broker.port, username="dev1", password="s3cret",
                           protocol="3.1.1")
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("upstream connected"), proc.output()
        _fire_alert(broker, card)
        assert alert.wait(15), proc.output()
        assert any(b.get("status") == "online" for b in got)
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        c.loop_stop()
        cloud_broker.close()

    # A wrong password is refused by the broker and reported, not a crash.
    cfg["upstream"]["password"] = "wrong"
    cfg["state_dir"] = str(tmp_path / "state2")
    cloud_broker = LocalBroker(conf, workdir=tmp_path / "pw2").start()
    cfg["upstream"]["port"] = cloud_broker.port
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("refused the connection", timeout=15), proc.output()
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        cloud_broker.close()


def test_local_broker_restart_keeps_the_subscriptions(tmp_path, broker, card):
    cloud_broker = LocalBroker(workdir=tmp_path / "cloud").start()
    cloud = Cloud(cloud_broker.port)
    cfg = agent_config(tmp_path, broker.port, warmup=32)
    cfg["upstream"]["port"] = cloud_broker.port
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        broker.restart()  # a broker without persistence forgets every subscription
        assert proc.wait_log("local broker disconnected")
        deadline = time.monotonic() + 20
        while proc.output().count("subscribed to") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.output().count("subscribed to") >= 2, proc.output()
        _fire_alert(broker, card)
        assert cloud.wait_for(lambda c: len(c.of("alert")) >= 1, timeout=15), proc.output()
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        cloud.close()
        cloud_broker.close()
