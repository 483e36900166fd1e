"""The real ``edge-agent`` processes: a push under load, SIGKILL around a swap, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from .conftest import SKAB_FIELDS, AgentProcess, normal_rows, publisher, write_config
from .fleet_support import StatusWatcher, fleet_config, key, push, release, watcher  # noqa: F401

EXE = str(Path(sys.executable).parent / "edge-agent")
WINDOW, HOP = 16, 4  # conftest's stream


def _frames(rows, size):
    return [json.dumps({"ts": [r["ts"] for r in rows[i:i + size]],
                        **{f: [r[f] for r in rows[i:i + size]] for f in SKAB_FIELDS}})
            for i in range(0, len(rows), size)]


def _last_status(cloud):
    return [b for b in cloud.of("status") if b.get("status") == "online"][-1]


@pytest.mark.slow
def test_push_under_load_loses_no_window(tmp_path, key, broker, cloud, watcher, card):
    cfg = fleet_config(tmp_path, broker.port, key[1], canary_windows=200, watch_windows=200)
    proc = AgentProcess(write_config(tmp_path, cfg))
    assert proc.wait_log("subscribed to"), proc.output()
    n = 24_000
    frames = _frames(normal_rows(card, n), 40)
    pub = publisher(broker.port)
    sent = threading.Event()

    def stream():
        # ~8k samples/s, steady, for ~3 s: the push lands in the middle of it.
        for i, f in enumerate(frames):
            pub.publish("sensors/pump/a", f, qos=1)
            if i % 10 == 9:
                time.sleep(0.05)
        sent.set()

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    push(release(tmp_path, key[0], 2), broker.port)
    t.join()
    watcher.state("active", 2, watch="passed", timeout=30)
    expected = (n - WINDOW) // HOP + 1  # every window, warm-up ones included
    assert cloud.wait_for(lambda c: _last_status(c)["streams"]["pump"]["samples"] == n
                          and _last_status(c)["streams"]["pump"]["windows"] == expected,
                          timeout=20), _last_status(cloud)
    s = _last_status(cloud)["streams"]["pump"]
    assert s["windows_dropped"] == 0 and s["model_version"] == 2
    assert cloud.of("alert") == []
    pub.loop_stop()
    assert proc.terminate() == 0
    assert "model skab-ae v2 is active (was v1)" in proc.output()


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["staged", "active"])
def test_sigkill_around_the_swap_restarts_on_a_valid_model(tmp_path, key, broker, cloud, watcher,
                                                           card, kill_at):
    cfg = fleet_config(tmp_path, broker.port, key[1], canary_windows=0, watch_windows=0)
    path = write_config(tmp_path, cfg)
    proc = AgentProcess(path)
    assert proc.wait_log("subscribed to"), proc.output()
    push(release(tmp_path, key[0], 2), broker.port)
    watcher.state(kill_at, 2)
    proc.kill()  # SIGKILL, whatever it was doing
    # Restart: it must come up on a loadable model and end on v2 (the manifest is retained).
    r = subprocess.run([EXE, "models", "list", "--config", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "skab-ae v" in _run("models", "info", "skab-ae", "--config", path).stdout
    proc = AgentProcess(path)
    assert proc.wait_log("subscribed to"), proc.output()
    # Killed before the switch: v1 loads, and the re-delivered manifest finds v2
    # already staged; killed after it: v2 loads. Either way it ends on v2.
    pub = publisher(broker.port)
    for f in _frames(normal_rows(card, 400), 40):
        pub.publish("sensors/pump/a", f, qos=1)
    assert cloud.wait_for(lambda c: any(
        b.get("streams", {}).get("pump", {}).get("windows", 0) >= 80
        and b["streams"]["pump"]["model_version"] == 2 for b in c.of("status")), timeout=20)
    pub.loop_stop()
    assert proc.terminate() == 0


def _run(*args, cwd=None):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def test_operator_and_device_cli(tmp_path, broker, watcher, card):
    r = _run("fleet", "keygen", tmp_path / "ops")
    assert r.returncode == 0, r.stderr
    pub = (tmp_path / "ops.pub").read_text().strip()
    assert f'ops: "{pub}"' in r.stdout
    assert oct((tmp_path / "ops.pem").stat().st_mode & 0o777) == "0o600"
    assert _run("fleet", "keygen", tmp_path / "ops").returncode == 1  # never overwrites

    src = release(tmp_path, tmp_path / "ops.pem", 1).parent.parent / "src"
    model = next(src.iterdir())
    r = _run("fleet", "sign", model, "--key", tmp_path / "ops.pem", "--version", 2,
             "--out", tmp_path / "rel2", "--chunk-size", 4096)
    assert r.returncode == 0, r.stderr
    assert "skab-ae v2" in r.stdout and "key ops" in r.stdout

    cfg = fleet_config(tmp_path, broker.port, pub, canary_windows=0, watch_windows=0)
    cfg_path = write_config(tmp_path, cfg)
    assert _run("check-config", cfg_path).returncode == 0
    r = _run("models", "verify", tmp_path / "rel2", "--config", cfg_path)
    assert r.returncode == 0 and "ok: skab-ae v2 signed by ops" in r.stdout, r.stderr
    tampered = tmp_path / "rel2-bad"
    tampered.mkdir()
    (tampered / "model.tflite").write_bytes((tmp_path / "rel2" / "model.tflite").read_bytes())
    doc = json.loads((tmp_path / "rel2" / "manifest.json").read_text())
    doc["expires"] += 1
    (tampered / "manifest.json").write_text(json.dumps(doc))
    r = _run("models", "verify", tampered, "--config", cfg_path)
    assert r.returncode == 1 and "refused (bad_signature)" in r.stderr

    proc = AgentProcess(cfg_path)
    assert proc.wait_log("subscribed to"), proc.output()
    r = _run("fleet", "push", tmp_path / "rel2", "--group", "default",
             "--broker", f"127.0.0.1:{broker.port}")
    assert r.returncode == 0, r.stderr
    assert "pushed edge/fleet/default/model/skab-ae" in r.stdout
    watcher.state("active", 2)
    r = _run("fleet", "status", "--group", "default", "--broker", f"127.0.0.1:{broker.port}",
             "--wait", "0.5")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("dev1"))
    assert "active" in line and "skab-ae:2" in line
    assert proc.terminate() == 0

    r = _run("models", "list", "--config", cfg_path)
    assert "pump: skab-ae (delivered v2" in r.stdout and "active" in r.stdout, r.stdout
    assert "skab-ae v2 (delivered)" in _run("models", "info", "skab-ae", "--config",
                                            cfg_path).stdout
    r = _run("models", "rollback", "skab-ae", "--config", cfg_path)
    assert r.returncode == 0 and "v2 -> the configured model" in r.stdout, r.stderr
    r = _run("models", "list", "--config", cfg_path)
    assert "configured v1" in r.stdout and "refused: operator_rollback" in r.stdout, r.stdout
    assert _run("models", "rollback", "skab-ae", "--config", cfg_path).returncode == 1
    # The retained v2 manifest is not installed again after an operator rollback.
    cfg["log_level"] = "debug"
    proc = AgentProcess(write_config(tmp_path, cfg))
    assert proc.wait_log("refused before; ignored"), proc.output()
    assert proc.terminate() == 0
    assert "downloading" not in proc.output() and "v2 is active" not in proc.output()
    cfg["fleet"]["trusted_keys"] = {"ops": "bm90IGEga2V5"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    r = _run("check-config", bad)
    assert r.returncode == 1 and "fleet.trusted_keys.ops: not a base64 Ed25519" in r.stderr
