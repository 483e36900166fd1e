"""An episode that outlives `adapt.relearn_after_s` is taken as the new normal.

Inside an episode nothing adapts, so a machine whose normal moved for good (a new
operating point after maintenance) would stay in one episode for ever. Past the age
limit its windows are learnt from, it closes, and the resolved message says why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.config import parse_config
from agent.pipeline import Episode, StreamPipeline
from agent.scoring.registry import open_stream_model
from agent.uplink.messages import message_for

from .conftest import REPO, agent_config
from .frames_recording import LEVEL

T0 = 1.6e9


def _pump(n: int, shift_at: int | None = None, fault: tuple[int, int] | None = None
          ) -> np.ndarray:
    rng = np.random.default_rng(3)
    x = LEVEL * (1 + 0.01 * rng.standard_normal((n, 8)))
    if shift_at is not None:
        x[shift_at:, 2] *= 1.1  # the current moves to a new level, for good
    if fault is not None:
        x[fault[0]:fault[1], 7] *= 0.6  # a flow drop that ends
    return x


def _episodes(tmp_path: Any, x: np.ndarray, model: str, relearn: float) -> list[Episode]:
    """The stream's episode events for ``x`` at 1 Hz, fed as the live agent scores it."""
    cfg = parse_config(agent_config(tmp_path, 1883, model=model, warmup=400,
                                    adapt={"relearn_after_s": relearn}), base_dir=REPO)
    s = cfg.streams[0]
    card, scorer = open_stream_model(cfg, s)
    p = StreamPipeline(s, card, scorer)
    ts = T0 + np.arange(len(x), dtype=np.float64)
    out: list[Episode] = []
    for a in range(0, len(x), s.hop):  # one window at a time, as at 1 Hz
        out += [e for e in p.push(ts[a:a + s.hop], x[a:a + s.hop]) if isinstance(e, Episode)]
    return out


@pytest.mark.parametrize("model", ["none", "skab-ae"])
def test_a_new_normal_closes_its_episode_once_it_is_old_enough(tmp_path, model):
    x = _pump(7000, shift_at=1500)
    kept = _episodes(tmp_path, x, model, 0)
    assert [e.kind for e in kept] == ["alert"]  # without the limit it never ends
    assert T0 + 1500 <= kept[0].started < T0 + 1530

    got = _episodes(tmp_path, x, model, 1800)
    assert [e.kind for e in got] == ["alert", "resolved"]
    resolved = got[1]
    assert resolved.relearned
    assert 1800 <= resolved.duration_s < 3000
    body = message_for(resolved, "dev1", "edge")[2](7)
    assert body["event"] == "resolved" and body["relearned"] is True


def test_a_fault_that_ends_is_not_relearned(tmp_path):
    got = _episodes(tmp_path, _pump(3000, fault=(1500, 1560)), "none", 1800)
    assert [e.kind for e in got] == ["alert", "resolved"]
    assert not got[1].relearned and got[1].duration_s < 300
    body = message_for(got[1], "dev1", "edge")[2](8)
    assert body["relearned"] is False
