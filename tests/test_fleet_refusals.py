"""Every refusal, through a real broker into a real in-process Agent, with its reason
on the retained model status topic; and that nothing refused is ever loaded."""

from __future__ import annotations

import hashlib
import json

import paho.mqtt.publish as mqtt_publish

from .conftest import SKAB_FIELDS, normal_rows, publish_all, publisher
from .fleet_support import (  # noqa: F401  (key, start_agent, watcher are fixtures)
    key,
    make_key,
    push,
    release,
    shipped_variant,
    start_agent,
    watcher,
)


def _write_manifest(rel, edit):
    path = rel / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return rel


def _publish_raw(port, topic, payload, retain=True):
    mqtt_publish.single(topic, payload, qos=1, retain=retain, hostname="127.0.0.1", port=port)


def _assert_still_v1(agent):
    st = agent.streams[0]
    assert (st.card.name, st.card.version) == ("skab-ae", 1)
    assert st.slot.shadow is None
    assert agent.fleet is not None and agent.fleet.store.active("skab-ae") is None


def test_missing_signature(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])
    rel = _write_manifest(release(tmp_path, key[0], 2), lambda d: d.pop("signature"))
    push(rel, broker.port)
    s = watcher.state("rejected", code="missing_signature")
    assert "not signed" in s["reason"] and s["model"] == "skab-ae" and s["version"] == 2
    _assert_still_v1(agent)


def test_bad_signature_on_an_edited_manifest(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])

    def edit(d):
        d["version"] = 99  # signed as 2

    push(_write_manifest(release(tmp_path, key[0], 2), edit), broker.port)
    s = watcher.state("rejected", code="bad_signature")
    assert "does not verify" in s["reason"]
    _assert_still_v1(agent)


def test_unknown_key(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])
    other, _ = make_key(tmp_path, "intruder")
    push(release(tmp_path, other, 2, key_id="intruder"), broker.port)
    s = watcher.state("rejected", code="unknown_key")
    assert "'intruder'" in s["reason"]
    # A trusted key id with the wrong key is a bad signature, not an unknown key.
    push(release(tmp_path, other, 3, key_id="ops"), broker.port)
    watcher.state("rejected", 3, code="bad_signature")
    _assert_still_v1(agent)


def test_expired(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])
    push(release(tmp_path, key[0], 2, expires_in_s=-60), broker.port)
    s = watcher.state("rejected", code="expired")
    assert "expired at" in s["reason"]
    _assert_still_v1(agent)


def test_version_not_newer_unless_a_signed_rollback(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1], canary_windows=0, watch_windows=0)
    push(release(tmp_path, key[0], 1), broker.port)  # same version as the shipped model
    s = watcher.state("rejected", 1, code="not_newer")
    assert "not newer than the active v1" in s["reason"]
    _assert_still_v1(agent)
    push(release(tmp_path, key[0], 1, rollback=True, label="rb"), broker.port)
    watcher.state("active", 1)
    assert agent.streams[0].card.sha256 == hashlib.sha256(shipped_variant("v1")).hexdigest()


def test_size_over_cap_is_refused_before_anything_is_allocated(tmp_path, key, broker, watcher,
                                                                 start_agent):
    agent = start_agent(pub=key[1], max_model_bytes=4096)
    push(release(tmp_path, key[0], 2), broker.port)
    s = watcher.state("rejected", code="too_large")
    assert "over this device's cap of 4096" in s["reason"]
    incoming = agent.fleet.store.root / "incoming"
    assert not incoming.exists() or not any(incoming.iterdir()), "a .part file was created"
    assert agent.fleet.receiver.transfer is None
    _assert_still_v1(agent)


def test_chunk_size_over_cap(tmp_path, key, broker, watcher, start_agent):
    start_agent(pub=key[1], max_chunk_bytes=1024)
    push(release(tmp_path, key[0], 2, chunk_size=4096), broker.port)
    assert "chunks of 4096 bytes" in watcher.state("rejected", code="too_large")["reason"]


def test_wrong_hash(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])
    rel = release(tmp_path, key[0], 2)
    m = json.loads((rel / "manifest.json").read_text())
    data = bytearray((rel / "model.tflite").read_bytes())
    data[100] ^= 0xFF  # corrupted in transit / by another publisher: same length
    for i in range(m["chunks"]):
        _publish_raw(broker.port, f"edge/blobs/{m['sha256']}/{i}",
                     bytes(data[i * m["chunk_size"]:(i + 1) * m["chunk_size"]]))
    _publish_raw(broker.port, "edge/fleet/default/model/skab-ae", (rel / "manifest.json")
                 .read_bytes())
    s = watcher.state("rejected", code="hash_mismatch")
    assert "sha256" in s["reason"]
    _assert_still_v1(agent)
    # Remembered: a re-delivery of the same manifest is not downloaded again.
    assert m["sha256"] in agent.fleet.store.rejected("skab-ae")


def test_truncated_transfer_times_out(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1], download_timeout_s=1.5, resubscribe_after_s=0.5)
    rel = release(tmp_path, key[0], 2)
    m = json.loads((rel / "manifest.json").read_text())
    assert m["chunks"] >= 3
    data = (rel / "model.tflite").read_bytes()
    _publish_raw(broker.port, f"edge/blobs/{m['sha256']}/0", data[:m["chunk_size"]])
    _publish_raw(broker.port, "edge/fleet/default/model/skab-ae",
                 (rel / "manifest.json").read_bytes())
    watcher.state("downloading", 2)
    s = watcher.state("rejected", code="truncated")
    assert f"1 of {m['chunks']} chunks" in s["reason"]
    assert agent.fleet.receiver.transfer is None
    assert not list((agent.fleet.store.root / "incoming").glob("*.part"))
    _assert_still_v1(agent)


def test_short_last_chunk_is_truncated(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])
    rel = release(tmp_path, key[0], 2)
    m = json.loads((rel / "manifest.json").read_text())
    data = (rel / "model.tflite").read_bytes()
    n, cs = m["chunks"], m["chunk_size"]
    for i in range(n):
        chunk = data[i * cs:(i + 1) * cs]
        _publish_raw(broker.port, f"edge/blobs/{m['sha256']}/{i}",
                     chunk[:-10] if i == n - 1 else chunk)
    _publish_raw(broker.port, "edge/fleet/default/model/skab-ae",
                 (rel / "manifest.json").read_bytes())
    s = watcher.state("rejected", code="truncated")
    assert f"chunk {n - 1} has" in s["reason"]
    _assert_still_v1(agent)


def test_input_spec_that_does_not_fit_the_stream(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])
    fields = [*SKAB_FIELDS[1:], SKAB_FIELDS[0]]  # same channels, another order
    push(release(tmp_path, key[0], 2, input={"fields": fields}), broker.port)
    s = watcher.state("rejected", code="input_mismatch")
    assert "stream pump" in s["reason"]
    push(release(tmp_path, key[0], 3, input={"window": 32}), broker.port)
    assert "takes 32 x" in watcher.state("rejected", 3, code="input_mismatch")["reason"]
    _assert_still_v1(agent)


def test_model_that_does_not_load(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])
    push(release(tmp_path, key[0], 2, b"not a flatbuffer" * 64), broker.port)
    watcher.state("staged", 2)
    s = watcher.state("rejected", 2, code="load_failed")
    assert "not a loadable TFLite model" in s["reason"]
    _assert_still_v1(agent)
    assert agent.fleet.store.versions("skab-ae") == []  # discarded


def test_garbage_manifest_and_model_nobody_runs(tmp_path, key, broker, watcher, start_agent):
    agent = start_agent(pub=key[1])
    _publish_raw(broker.port, "edge/fleet/default/model/skab-ae", b"{not json")
    assert "not JSON" in watcher.state("rejected", code="bad_manifest")["reason"]
    push(release(tmp_path, key[0], 2, label="other", name="other-model"), broker.port)
    s = watcher.state("rejected", code="no_stream")
    assert s["model"] == "other-model"
    _assert_still_v1(agent)


def test_accepted_update_goes_through_every_state_and_is_used(tmp_path, key, broker, watcher,
                                                              start_agent, card):
    agent = start_agent(pub=key[1])
    rel = release(tmp_path, key[0], 2)
    push(rel, broker.port)
    watcher.state("canary", 2)
    pub = publisher(broker.port)
    rows = normal_rows(card, 240)
    publish_all(pub, "sensors/pump/a", rows)
    watcher.state("active", 2)
    # The canary decides on the fleet thread while ingest goes on, so the windows
    # of that burst may all be scored before the swap: feed the watch its own.
    publish_all(pub, "sensors/pump/a", normal_rows(card, 120, seed=1, t0=rows[-1]["ts"] + 1))
    watcher.state("active", 2, watch="passed")
    assert watcher.states()[:4] == ["downloading", "staged", "canary", "active"]
    st = agent.streams[0]
    assert st.card.version == 2 and st.slot.shadow is None
    active = agent.fleet.store.active("skab-ae")
    assert active is not None and active.version == 2
    pub.loop_stop()
