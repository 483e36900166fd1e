import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")

MINIMAL = {
    "device_id": "d1",
    "streams": [{"name": "s", "topic": "a/b", "fields": ["x"], "format": "float",
                 "model": "skab-ae"}],
}


def problems(raw):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return e.value.problems


def test_example_config_is_valid_and_documents_every_option():
    cfg = load_config(REPO / "config" / "agent.example.yaml")
    assert cfg.device_id
    text = (REPO / "config" / "agent.example.yaml").read_text()
    import dataclasses

    from agent import config as c

    for cls in (c.AgentConfig, c.LocalConfig, c.UpstreamConfig, c.StreamConfig, c.AlertConfig,
                c.TLSConfig, c.OutboxConfig, c.BackendOptions, c.HealthConfig, c.LiveConfig,
                c.HomeAssistantConfig):
        for f in dataclasses.fields(cls):
            if not f.metadata.get("internal"):
                assert f"{f.name}:" in text, f"{cls.__name__}.{f.name} is not documented"


def test_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.upstream.prefix == "edge"
    assert cfg.local.port == 1883
    assert cfg.streams[0].alert.threshold == "auto"


def test_unknown_keys_are_errors_with_paths():
    raw = {**MINIMAL, "uplink": {}, "streams": [{**MINIMAL["streams"][0], "windw": 3}]}
    p = problems(raw)
    assert "uplink: unknown key" in p
    assert any(x.startswith("streams[0].windw: unknown key") for x in p)


def test_typos_get_a_hint():
    p = problems({**MINIMAL, "stateDir": "/x"})
    assert p == ["stateDir: unknown key (did you mean state_dir?)"]


@pytest.mark.parametrize(("patch", "expected"), [
    ({"local": {"port": 70000}}, "local.port: must be <= 65535"),
    ({"local": {"port": "x"}}, "local.port: must be an integer"),
    ({"upstream": {"protocol": "4"}}, "upstream.protocol: must be one of 5, 3.1.1"),
    ({"device_id": "a/b"}, "device_id: use 1-64"),
    ({"streams": []}, "streams: configure at least one stream"),
    ({"upstream": {"prefix": "a/#"}}, "upstream.prefix: must be a non-empty topic"),
    ({"upstream": {"tls": {"ca_file": "/nonexistent/ca.pem"}}}, "upstream.tls.ca_file: file not"),
])
def test_bad_values(patch, expected):
    assert any(p.startswith(expected) for p in problems({**MINIMAL, **patch})), problems(
        {**MINIMAL, **patch})


@pytest.mark.parametrize(("stream_patch", "expected"), [
    ({"window": 1}, "streams[0].window: must be >= 2"),
    ({"hop": 40, "window": 16}, "streams[0].hop: must be <= window"),
    ({"topic": "a/#/b"}, "streams[0].topic: not a valid MQTT topic filter"),
    ({"format": "xml"}, "streams[0].format: must be one of json, msgpack, csv, float, f32"),
    ({"fields": ["x", "y"]}, "streams[0].format: float payloads carry one channel"),
    ({"alert": {"threshold": "high"}}, "streams[0].alert.threshold: must be a number or one of"),
    ({"alert": {"quantile": 1.5}}, "streams[0].alert.quantile: must be <= 1"),
    ({"name": "a b"}, "streams[0].name: use 1-64"),
    ({"buffer": 10, "window": 16}, "streams[0].buffer: must hold at least"),
    ({"max_delay_ms": -1}, "streams[0].max_delay_ms: must be >= 0"),
    ({"max_delay_ms": "soon"}, "streams[0].max_delay_ms: "),
])
def test_bad_stream_values(stream_patch, expected):
    raw = {**MINIMAL, "streams": [{**MINIMAL["streams"][0], **stream_patch}]}
    p = problems(raw)
    assert any(x.startswith(expected) for x in p), p


def test_missing_required_fields_are_all_reported():
    p = problems({"streams": [{"name": "s"}]})
    assert "device_id: required (this device's id, used in topics and messages)" in p
    assert any(x.startswith("streams[0].topic: required") for x in p)
    assert any(x.startswith("streams[0].fields: required") for x in p)


def test_numeric_threshold_and_duplicate_streams():
    s = MINIMAL["streams"][0]
    cfg = parse_config({**MINIMAL, "streams": [{**s, "alert": {"threshold": 0.5}}]})
    assert cfg.streams[0].alert.threshold == 0.5
    assert any("duplicate stream name" in x for x in problems({**MINIMAL, "streams": [s, s]}))


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({
        "device_id": "d1",
        "streams": [{"name": "pump", "topic": "p/#", "window": 16,
                     "fields": [f"c{i}" for i in range(8)]}],
    }))
    r = subprocess.run([EDGE_AGENT, "check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: d1\nlocal: {port: 0}\nstreams:\n  - {name: s, topic: t}\n")
    r = subprocess.run([EDGE_AGENT, "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "local.port: must be >= 1, got 0" in r.stderr
    assert "streams[0].fields: required" in r.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("device_id: [unclosed\n")
    r = subprocess.run([EDGE_AGENT, "check-config", str(broken)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("(yaml) line")

    missing = subprocess.run([EDGE_AGENT, "check-config", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 1


def test_check_config_catches_model_mismatch(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text(yaml.safe_dump({
        "device_id": "d1",
        "streams": [{"name": "pump", "topic": "p/#", "window": 32,
                     "fields": [f"c{i}" for i in range(3)]}],
    }))
    r = subprocess.run([EDGE_AGENT, "check-config", str(p)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "streams[0].model: model skab-ae takes windows of 16 samples" in r.stderr


def test_version():
    r = subprocess.run([EDGE_AGENT, "--version"], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.startswith("edge-agent ")
