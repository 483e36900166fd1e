"""The stream pipeline on its own: no broker, no outbox, no threads; and the import rules
that keep it that way."""

from __future__ import annotations

import ast
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent import state
from agent.config import parse_config
from agent.pipeline import Episode, ScoreBatch, StreamPipeline
from agent.pipeline.stream import SCORE_MAX
from agent.scoring.registry import open_stream_model

from .conftest import REPO, SKAB_FIELDS, agent_config

AGENT = REPO / "agent"


def _pipeline(tmp_path: Path, **over) -> StreamPipeline:
    cfg = parse_config(agent_config(tmp_path, 1883, **over), base_dir=REPO)
    card, scorer = open_stream_model(cfg, cfg.streams[0])
    return StreamPipeline(cfg.streams[0], card, scorer)


def _rows(card, n: int, seed: int = 0, fault: slice | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = card.mean + card.std * 0.3 * rng.standard_normal((n, len(card.mean)))
    if fault is not None:
        x[fault, 2] += card.std[2] * 25
    return x.astype(np.float32)


def test_push_gives_one_score_record_per_window_and_episodes_open_and_close(tmp_path, card):
    p = _pipeline(tmp_path, warmup=64, alert={"cooldown_s": 0, "clear_windows": 3})
    x = _rows(card, 600, fault=slice(300, 340))
    ts = 1e9 + np.arange(600.0)
    events = []
    for a in range(0, 600, 50):
        events += p.push(ts[a:a + 50], x[a:a + 50])
    batches = [e for e in events if isinstance(e, ScoreBatch)]
    ends = np.concatenate([b.end_index for b in batches])
    np.testing.assert_array_equal(ends, np.arange(16, 601, 4))
    assert all(b.warm for b in batches if b.end_index[-1] <= 64)
    episodes = [e for e in events if isinstance(e, Episode)]
    assert [e.kind for e in episodes] == ["alert", "resolved"], episodes
    opened, closed = episodes
    assert 1e9 + 300 <= opened.ts <= 1e9 + 320
    assert closed.ended is not None and closed.ended > 1e9 + 339
    assert closed.duration_s == pytest.approx(closed.ended - opened.started)
    assert closed.score >= opened.score  # the peak
    assert p.state == "normal" and p.alerts == 1


def test_state_round_trip_gives_identical_scores(tmp_path, card):
    x = _rows(card, 900, seed=3, fault=slice(700, 720))
    ts = 1e9 + np.arange(900.0)
    a = _pipeline(tmp_path)
    a.push(ts[:500], x[:500])
    blob = state.encode({"schema": state.SCHEMA}, a.to_state())
    b = _pipeline(tmp_path)
    _, body, arrays = state.decode(blob)
    b.load_state(state._restore(body, arrays))
    b.ring.extend(ts[:500], x[:500])  # the restored ring starts empty: refill it
    b.ring._next_end = a.ring._next_end
    ea, eb = a.push(ts[500:], x[500:]), b.push(ts[500:], x[500:])
    ra = np.concatenate([e.raw for e in ea if isinstance(e, ScoreBatch)])
    rb = np.concatenate([e.raw for e in eb if isinstance(e, ScoreBatch)])
    np.testing.assert_array_equal(ra, rb)
    assert [e.kind for e in ea if isinstance(e, Episode)] == \
        [e.kind for e in eb if isinstance(e, Episode)]


def _write_csv(path: Path, card, n: int) -> None:
    x = _rows(card, n, seed=5, fault=slice(n // 2, n // 2 + 30))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", *SKAB_FIELDS])
        for i, row in enumerate(x):
            w.writerow([1_700_000_000 + i, *(f"{v:.6g}" for v in row)])


REPLAY = """
import sys
for m in ("paho", "paho.mqtt", "paho.mqtt.client", "sqlite3", "_sqlite3", "sqlite_utils"):
    sys.modules[m] = None  # any import of them now raises ImportError
from pathlib import Path
from agent.config import parse_config
from agent.replay import replay
import yaml
cfg = parse_config(yaml.safe_load(Path(sys.argv[1]).read_text()), base_dir=sys.argv[3])
r = replay(cfg, Path(sys.argv[2]), None)
print(" ".join(f"{v:.7g}" for v in r.score))
print(r.alerts)
assert "agent.daemon" not in sys.modules and "agent.uplink.outbox" not in sys.modules
"""


def test_replay_runs_without_paho_or_sqlite_and_gives_the_same_scores(tmp_path, card):
    import yaml

    from agent.replay import replay

    rec = tmp_path / "rec.csv"
    _write_csv(rec, card, 800)
    raw = agent_config(tmp_path, 1883)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    here = replay(parse_config(raw, base_dir=REPO), rec, None)
    r = subprocess.run([sys.executable, "-c", REPLAY, str(cfg_path), str(rec), str(REPO)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    scores, alerts = r.stdout.strip().splitlines()
    assert scores == " ".join(f"{v:.7g}" for v in here.score)
    assert int(alerts) == here.alerts >= 1


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_follow_the_data_flow():
    for f in (AGENT / "pipeline").glob("*.py"):
        bad = {m for m in _imports(f) if m.startswith(("paho", "agent.uplink", "agent.daemon",
                                                        "sqlite3", "agent.fleet"))}
        assert not bad, f"{f.name} imports {bad}"
    for f in (AGENT / "fleet").glob("*.py"):
        assert not {m for m in _imports(f) if m.startswith("agent.daemon")}, f.name
    for f in (AGENT / "scoring").glob("*.py"):
        bad = {m for m in _imports(f) if m.startswith(("paho", "agent.uplink", "agent.daemon",
                                                        "agent.pipeline"))}
        assert not bad, f"{f.name} imports {bad}"
    assert not {m for m in _imports(AGENT / "replay.py")
                if m.startswith(("agent.daemon", "agent.uplink", "paho"))}


def test_import_agent_stays_light():
    code = ("import sys, agent\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('paho', 'ai_edge_litert', 'tflite_runtime', 'river', 'scipy', 'sqlite3')]\n"
            "print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_single_channel_default_keeps_its_threshold_across_a_reload(tmp_path):
    p = _pipeline(tmp_path, fields=["value"], format="float", model="none", window=8, hop=1,
                  warmup=150)
    assert p.post is not None and p.slot.card.name == "windowed-gaussian"
    rng = np.random.default_rng(0)
    x = (10 + rng.standard_normal((400, 1))).astype(np.float32)
    x[300] = 40.0  # far beyond the range seen so far
    events = p.push(1e9 + np.arange(400.0), x)
    assert p.threshold == pytest.approx(0.45)
    opened = [e for e in events if isinstance(e, Episode) and e.kind == "alert"]
    assert len(opened) == 1 and opened[0].ts == pytest.approx(1e9 + 300)
    p.reconfigure(p.cfg)  # a SIGHUP that changed nothing
    assert p.threshold == pytest.approx(0.45)


def test_a_summary_counts_each_episode_once(tmp_path, card):
    # One push scores many batches; an alert in an early batch must not be counted again
    # by every later batch of the same push.
    p = _pipeline(tmp_path, warmup=64, summary_s=3600, alert={"cooldown_s": 0})
    x = _rows(card, 1200, fault=slice(300, 340))
    events = p.push(1e9 + np.arange(1200.0), x)
    opened = sum(1 for e in events if isinstance(e, Episode) and e.kind == "alert")
    assert opened == 1
    summary = p.flush_summary(force=True)
    assert summary is not None and summary.body["alerts"] == opened


def test_non_finite_and_huge_scores_become_score_max_and_are_counted(tmp_path, card):
    """A model that answers NaN, infinity or beyond SCORE_MAX: those windows score as
    SCORE_MAX (they alert), -inf as 0, finite ones stay as they are, and the non-finite
    ones are counted."""
    p = _pipeline(tmp_path, warmup=64, summary_s=0)
    x = _rows(card, 200)
    ts = 1e9 + np.arange(200.0)
    p.push(ts[:100], x[:100])  # past the warm-up
    answers = np.array([np.nan, np.inf, -np.inf, 1e38, 0.5], dtype=np.float32)
    p.slot.scorer.score = lambda w: answers[:len(w)].copy()  # type: ignore[method-assign]
    events = p.push(ts[100:120], x[100:120])
    raw = np.concatenate([e.raw for e in events if isinstance(e, ScoreBatch)])
    np.testing.assert_array_equal(raw, np.array([SCORE_MAX, SCORE_MAX, 0.0, SCORE_MAX, 0.5],
                                                dtype=np.float32))
    assert p.nonfinite_scores == 3


def test_pca_stream_leaves_a_slowly_drifting_channel_out_and_still_catches_a_level_drop(
        tmp_path):
    """A temperature that ramps (found slow in warm-up) does not alert when it ramps
    faster later, unless slow channels are scored by their change; a drop in a level
    channel opens an episode either way."""
    rng = np.random.default_rng(1)
    n = 2000
    t = np.arange(n, dtype=np.float64)
    x = np.stack([30 + 0.4 * rng.standard_normal(n), 2 + 0.1 * rng.standard_normal(n),
                  60 + 0.02 * t + 0.05 * rng.standard_normal(n)], axis=1)
    x[1200:1400, 2] += 0.3 * (t[1200:1400] - 1200)  # a ramp 15x steeper than the warm-up's
    x[1700:, 0] -= 3.0  # the flow falls and stays down
    opened = {}
    for mode in ("skip", "change"):
        p = _pipeline(tmp_path, fields=["flow", "current", "temp"], model="none", window=16,
                      hop=4, warmup=800, alert={"margin": 1.3},
                      adapt={"input_halflife": 0, "pca_slow": mode})
        events = p.push(1e9 + t, x.astype(np.float32))
        assert p.scaling.transforms == ["level", "level", "diff"]
        picked = p.slot.scorer.channels
        assert (picked.tolist() if picked is not None else None) == (
            [0, 1] if mode == "skip" else None)
        opened[mode] = [e.ts - 1e9 for e in events if isinstance(e, Episode)
                        and e.kind == "alert"]
    assert not [ts for ts in opened["skip"] if 1200 <= ts < 1416]
    assert [ts for ts in opened["change"] if 1200 <= ts < 1416]
    for mode in ("skip", "change"):
        assert [ts for ts in opened[mode] if 1700 <= ts <= 1740]
