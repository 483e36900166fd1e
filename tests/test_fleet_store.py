"""Manifests (canonical JSON, signatures, parsing) and the on-device model store,
including a real SIGKILL at every step of staging and activation."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from agent.fleet.manifest import (
    Refusal,
    canonical_json,
    load_private_key,
    parse_manifest,
    public_key_from_b64,
    verify_manifest,
)
from agent.fleet.store import ModelStore
from agent.scoring import ModelError, load_card

from .fleet_support import make_key, release, shipped_variant


def _manifest(rel):
    return parse_manifest((rel / "manifest.json").read_bytes())


def test_canonical_json_is_order_and_whitespace_independent():
    a = canonical_json({"b": [1, 2.5, "é"], "a": {"y": None, "x": True}})
    b = canonical_json(json.loads('{ "a": {"x": true, "y": null},\n "b": [1, 2.5, "é"] }'))
    assert a == b == '{"a":{"x":true,"y":null},"b":[1,2.5,"é"]}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_signed_manifest_verifies_and_survives_reformatting(tmp_path):
    key, pub = make_key(tmp_path)
    rel = release(tmp_path, key, 2)
    doc = json.loads((rel / "manifest.json").read_text())
    # Re-serialised with other key order and spacing: still the same canonical bytes.
    shuffled = json.dumps(dict(reversed(list(doc.items()))), indent=4).encode()
    m = parse_manifest(shuffled)
    verify_manifest(m, {"ops": public_key_from_b64(pub)}, now=m.created)
    assert (m.name, m.version, m.chunks) == ("skab-ae", 2, -(-m.size // 4096))
    assert m.chunk_len(m.chunks - 1) == m.size - 4096 * (m.chunks - 1)


@pytest.mark.parametrize(("edit", "code"), [
    (lambda d: d.pop("signature"), "missing_signature"),
    (lambda d: d.update(size=d["size"] + 1, chunks=d["chunks"]), "bad_signature"),
    (lambda d: d.update(signature=base64.b64encode(b"x" * 64).decode()), "bad_signature"),
    (lambda d: d.update(signature="not base64!"), "bad_signature"),
    (lambda d: d.update(key_id="nobody"), "unknown_key"),
    (lambda d: d.update(rollback=True), "bad_signature"),
    (lambda d: d["input"].update(window=32), "bad_signature"),
])
def test_every_field_is_covered_by_the_signature(tmp_path, edit, code):
    key, pub = make_key(tmp_path)
    doc = json.loads((release(tmp_path, key, 2) / "manifest.json").read_text())
    edit(doc)
    m = parse_manifest(json.dumps(doc).encode())
    with pytest.raises(Refusal) as e:
        verify_manifest(m, {"ops": public_key_from_b64(pub)}, now=m.created)
    assert e.value.code == code


def test_expiry_is_checked_after_the_signature(tmp_path):
    key, pub = make_key(tmp_path)
    m = _manifest(release(tmp_path, key, 2, expires_in_s=10))
    trusted = {"ops": public_key_from_b64(pub)}
    verify_manifest(m, trusted, now=m.expires - 1)
    with pytest.raises(Refusal, match="expired"):
        verify_manifest(m, trusted, now=m.expires)


@pytest.mark.parametrize(("payload", "match"), [
    (b"[]", "JSON object"),
    (b"\xff", "not JSON"),
    (b"x" * 70_000, "at most"),
    (json.dumps({"schema": 2}).encode(), "schema 2"),
])
def test_malformed_manifests(payload, match):
    with pytest.raises(Refusal, match=match) as e:
        parse_manifest(payload)
    assert e.value.code == "bad_manifest"


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d.update(chunks=d["chunks"] + 1), "make"),
    (lambda d: d.update(size=-1), ">= 1"),
    (lambda d: d.update(sha256="ABC"), "hex"),
    (lambda d: d.update(name="status"), "not 'status'"),
    (lambda d: d.update(name="a/b"), "name must be"),
    (lambda d: d.update(version=True), "version must be int"),
    (lambda d: d.update(input={"window": 16}), "input needs"),
    (lambda d: d.update(rollback="yes"), "rollback must be"),
])
def test_manifest_shape_errors(tmp_path, edit, match):
    key, _ = make_key(tmp_path)
    doc = json.loads((release(tmp_path, key, 2) / "manifest.json").read_text())
    edit(doc)
    with pytest.raises(Refusal, match=match):
        parse_manifest(json.dumps(doc).encode())


def test_key_helpers_reject_wrong_material(tmp_path):
    with pytest.raises(ValueError, match="32 bytes"):
        public_key_from_b64(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="not base64"):
        public_key_from_b64("@@@")
    p = tmp_path / "rsa.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ValueError, match="not an Ed25519"):
        load_private_key(p)


# -- store ----------------------------------------------------------------------------


def _stage(store, tmp_path, version, key):
    rel = release(tmp_path, key, version)
    m = _manifest(rel)
    part = store.incoming(m.sha256)
    part.write_bytes((rel / "model.tflite").read_bytes())
    return m, store.stage(m, part)


def test_store_stage_activate_rollback(tmp_path):
    key, _ = make_key(tmp_path)
    store = ModelStore(tmp_path / "models")
    _, v2 = _stage(store, tmp_path, 2, key)
    assert store.active("skab-ae") is None
    store.activate("skab-ae", v2)
    assert store.load_active("skab-ae").version == 2
    assert store.previous("skab-ae") is None
    _, v3 = _stage(store, tmp_path, 3, key)
    store.activate("skab-ae", v3)
    assert store.active("skab-ae").version == 3 and store.previous("skab-ae").version == 2
    assert store.rollback("skab-ae").version == 2
    assert store.load_active("skab-ae").version == 2 and store.previous("skab-ae") is None
    with pytest.raises(ModelError, match="no previous"):
        store.rollback("skab-ae")
    # Old versions beyond active, previous and one more are pruned.
    for v in (4, 5, 6):
        store.activate("skab-ae", _stage(store, tmp_path, v, key)[1])
    assert [v.version for v in store.versions("skab-ae")] == [4, 5, 6]


def test_store_falls_back_to_previous_when_active_is_damaged(tmp_path):
    key, _ = make_key(tmp_path)
    store = ModelStore(tmp_path / "models")
    store.activate("skab-ae", _stage(store, tmp_path, 2, key)[1])
    _, v3 = _stage(store, tmp_path, 3, key)
    store.activate("skab-ae", v3)
    (v3.path / "model.tflite").write_bytes(b"bit rot")
    assert store.load_active("skab-ae").version == 2


def test_rejected_are_remembered_and_bounded(tmp_path):
    store = ModelStore(tmp_path / "models", clock=lambda: 5.0)
    for i in range(105):
        store.reject("m", f"{i:064x}", i, "canary_failed", "x")
    rej = ModelStore(tmp_path / "models").rejected("m")
    assert len(rej) == 100 and f"{104:064x}" in rej and f"{0:064x}" not in rej
    assert rej[f"{104:064x}"]["ts"] == 5.0


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, json
    from pathlib import Path
    from agent.fleet.manifest import parse_manifest
    from agent.fleet.store import ModelStore
    root, rel, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    store = ModelStore(root)
    m = parse_manifest((rel / "manifest.json").read_bytes())
    part = store.incoming(m.sha256)
    part.write_bytes((rel / "model.tflite").read_bytes())
    def hook(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
    v = store.stage(m, part, on_step=hook)
    store.activate(m.name, v, on_step=hook)
    print("finished")
""")


@pytest.mark.parametrize("step", ["staged-tmp", "staged", "previous-linked", "active-linked",
                                  "never"])
def test_sigkill_at_every_step_leaves_a_loadable_model(tmp_path, step):
    key, _ = make_key(tmp_path)
    root = tmp_path / "models"
    store = ModelStore(root)
    store.activate("skab-ae", _stage(store, tmp_path, 2, key)[1])
    rel = release(tmp_path, key, 3)
    r = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(root), str(rel), step],
                       capture_output=True, text=True, timeout=60)
    if step == "never":
        assert r.returncode == 0 and "finished" in r.stdout, r.stderr
    else:
        assert r.returncode == -signal.SIGKILL, r.stderr
    after = ModelStore(root)
    card = after.load_active("skab-ae")
    assert card is not None
    load_card(card.path.parent / "model.json")  # size and sha256 match
    expected = 3 if step in ("active-linked", "never") else 2
    assert card.version == expected
    # No half-written version is visible; leftovers are temporary names only.
    for v in after.versions("skab-ae"):
        load_card(v.card_path)
    assert all(p.name.startswith(".") or p.name.split("-")[0].isdigit()
               for p in (root / "skab-ae" / "versions").iterdir())
    assert os.readlink(root / "skab-ae" / "active").startswith("versions/")


def test_variants_differ_only_in_description():
    a, b = shipped_variant("v2"), shipped_variant("v3")
    assert a != b and len(a) == len(b)
    assert sum(x != y for x, y in zip(a, b, strict=True)) <= 15


def test_fleet_options_are_documented_and_checked():
    import dataclasses

    from agent.config import ConfigError, FleetConfig, parse_config

    from .conftest import REPO

    text = (REPO / "config" / "agent.example.yaml").read_text()
    for f in dataclasses.fields(FleetConfig):
        assert f"  {f.name}:" in text, f"fleet.{f.name} is not documented"
    base = {"device_id": "d", "streams": [{"name": "s", "topic": "t", "fields": ["x"],
                                           "format": "float"}]}
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "fleet": {"enabled": True, "group": "a/b",
                                        "trusted_keys": {"k": "AAAA"}, "canary_windows": -1}})
    p = e.value.problems
    assert "fleet.canary_windows: must be >= 0, got -1" in p
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "fleet": {"enabled": True, "group": "a/b",
                                        "trusted_keys": {"k": "AAAA"}}})
    p = e.value.problems
    assert "fleet.group: use 1-64 letters, digits, '_', '-' or '.' (it is a topic level)" in p
    assert any(x.startswith("fleet.trusted_keys.k: not a base64 Ed25519") for x in p)
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "fleet": {"enabled": True}})
    assert e.value.problems == ["fleet.trusted_keys: fleet.enabled needs at least one "
                                "trusted key"]
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config({**base, "fleet": {"trusted_keys": ["x"]}})


def _fleet_cfg(tmp_path, key):
    from agent.config import parse_config

    from .fleet_support import fleet_config

    return parse_config(fleet_config(tmp_path, 1, key[1]), base_dir=tmp_path)


def test_a_model_the_agent_keeps_dying_in_is_refused_for_good(tmp_path):
    key = make_key(tmp_path)
    from agent.fleet.manager import TRIAL_ATTEMPTS_MAX, recover_interrupted_trial, store_for

    cfg = _fleet_cfg(tmp_path, key)
    store = store_for(cfg)
    m, _ = _stage(store, tmp_path, 2, key[0])
    assert recover_interrupted_trial(cfg) is None  # nothing was being tried
    for attempt in range(1, TRIAL_ATTEMPTS_MAX + 1):
        # What _on_staged records before loading the model; then the process dies.
        store.begin_trial(m.name, m.version, m.sha256, "canary")
        rec = recover_interrupted_trial(cfg)
        assert rec is not None
        if attempt < TRIAL_ATTEMPTS_MAX:
            assert rec["outcome"] == "retry"
    assert rec["outcome"] == "rejected" and "died" in rec["reason"]
    assert m.sha256 in store.rejected(m.name)
    assert store.find(m.name, m.version, m.sha256) is None and store.trial() is None


def test_a_version_interrupted_in_its_watch_is_switched_back(tmp_path):
    key = make_key(tmp_path)
    from agent.fleet.manager import recover_interrupted_trial, store_for

    cfg = _fleet_cfg(tmp_path, key)
    store = store_for(cfg)
    _, v2 = _stage(store, tmp_path, 2, key[0])
    store.activate("skab-ae", v2)
    m3, v3 = _stage(store, tmp_path, 3, key[0])
    store.begin_trial(m3.name, m3.version, m3.sha256, "watch")
    store.activate("skab-ae", v3)  # promoted; then the process is killed mid-watch
    rec = recover_interrupted_trial(cfg)
    assert rec is not None and rec["outcome"] == "retry"
    active = store.active("skab-ae")
    assert active is not None and active.version == 2  # never left running unwatched
