"""Fleet and service regressions found in review (in-process agent, no broker needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load_config, parse_config
from agent.daemon import Agent

from .conftest import agent_config
from .fleet_support import SHIPPED, make_key, model_dir, release, shipped_variant


class Msg:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic, self.payload = topic, payload


def _agent(tmp: Path, extra_models: tuple[str, ...] = ()) -> tuple[Path, Agent]:
    keyf, pub = make_key(tmp)
    cfg = agent_config(tmp, 1)
    for name in extra_models:
        d = model_dir(tmp / "models", (SHIPPED / "model.tflite").read_bytes(), name, name=name)
        cfg["streams"].append({**cfg["streams"][0], "name": f"s_{name}",
                               "topic": f"sensors/{name}/+", "model": str(d)})
    cfg["fleet"] = {"enabled": True, "trusted_keys": {"ops": pub}, "canary_windows": 8,
                    "watch_windows": 8}
    return keyf, Agent(parse_config(cfg, base_dir=tmp))


def _release(tmp: Path, keyf: Path, version: int, name: str = "skab-ae") -> Path:
    return release(tmp, keyf, version, shipped_variant(f"{name}{version}"), chunk_size=4096,
                   name=name)


def _messages(rel: Path) -> tuple[dict[str, Any], tuple[str, bytes], list[tuple[str, bytes]]]:
    m = json.loads((rel / "manifest.json").read_text())
    data = (rel / "model.tflite").read_bytes()
    size = m["chunk_size"]
    chunks = [(f"edge/blobs/{m['sha256']}/{i}", data[i * size:(i + 1) * size])
              for i in range(m["chunks"])]
    return m, (f"edge/fleet/default/model/{m['name']}", json.dumps(m).encode()), chunks


def _feed(agent: Agent, items: list[tuple[str, bytes]], manifest: bool) -> None:
    fm = agent.fleet
    assert fm is not None
    for topic, payload in items:
        if manifest:
            fm._on_manifest(Msg(topic, payload))  # type: ignore[arg-type]
        else:
            fm._on_chunk(None, None, Msg(topic, payload))  # type: ignore[arg-type]


def test_a_second_model_waits_for_the_first_rollout(tmp_path: Path) -> None:
    keyf, agent = _agent(tmp_path, extra_models=("other",))
    fm = agent.fleet
    assert fm is not None
    _, man_a, chunks_a = _messages(_release(tmp_path, keyf, 2, "skab-ae"))
    _, man_b, chunks_b = _messages(_release(tmp_path, keyf, 2, "other"))
    _feed(agent, [man_a], True)
    fm.step()
    _feed(agent, [man_b], True)  # arrives while A downloads
    fm.step()
    _feed(agent, chunks_a, False)
    fm.step()
    assert fm.rollout is not None and fm.rollout.manifest.name == "skab-ae"
    _feed(agent, chunks_b, False)
    fm.step()
    # Still A's canary: B is held, not started beside it.
    assert fm.rollout.manifest.name == "skab-ae" and fm.rollout.phase == "canary"
    assert [st.slot.shadow is not None for st in agent.streams] == [True, False]
    agent.outbox.close()


def test_oversized_manifests_are_dropped_before_being_kept(tmp_path: Path) -> None:
    _, agent = _agent(tmp_path)
    fm = agent.fleet
    assert fm is not None
    for i in range(50):
        fm._on_manifest(Msg(f"edge/fleet/default/model/junk{i}", b"x" * (1 << 20)))  # type: ignore[arg-type]
    assert len(fm._inbox) == 0 and fm.dropped_manifests == 50
    agent.outbox.close()


def test_junk_chunk_indexes_and_oversized_duplicates_do_not_sink_a_release(tmp_path: Path
                                                                           ) -> None:
    keyf, agent = _agent(tmp_path)
    fm = agent.fleet
    assert fm is not None
    statuses: list[dict[str, Any]] = []
    fm.link.publish_status = lambda p: statuses.append(json.loads(p))  # type: ignore[method-assign]
    m, man, chunks = _messages(_release(tmp_path, keyf, 2))
    _feed(agent, [man], True)
    fm.step()
    fm.receiver.handle_chunk(f"edge/blobs/{m['sha256']}/\u00b2", b"x")  # a unicode digit
    fm.receiver.handle_chunk(chunks[0][0], chunks[0][1])
    fm.receiver.handle_chunk(chunks[0][0], chunks[0][1] + b"!")  # a stale, longer copy
    assert not any(s.get("state") == "rejected" for s in statuses), statuses
    assert m["sha256"] not in fm.store.rejected("skab-ae")
    for topic, payload in chunks[1:]:
        fm.receiver.handle_chunk(topic, payload)
    assert any(s.get("state") == "canary" for s in statuses), statuses
    agent.outbox.close()


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "a.yaml"
    p.write_bytes(b"# caf\xe9\ndevice_id: d\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)
    shutil.rmtree(tmp_path / "state", ignore_errors=True)
