"""`edge-agent replay` as a user runs it, and scripts/evaluate.py on tiny inputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from evallib import nab  # scripts/ is on sys.path (tests/conftest.py)

from .conftest import REPO, SKAB_FIELDS, agent_config, write_config

EXE = str(Path(sys.executable).parent / "edge-agent")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def skab_csv(path: Path, card, n_normal: int = 500, n_bad: int = 40) -> None:
    rng = np.random.default_rng(0)
    vals = card.mean + card.std * 0.3 * rng.standard_normal((n_normal + n_bad, 8))
    vals[n_normal:] = card.mean + card.std * 25.0
    with path.open("w") as f:
        f.write(";".join(["datetime", *SKAB_FIELDS, "anomaly", "changepoint"]) + "\n")
        for i, v in enumerate(vals):
            row = [_iso(1.6e9 + i), *(f"{x:.6g}" for x in v), str(float(i >= n_normal)), "0.0"]
            f.write(";".join(row) + "\n")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "replay", *args], capture_output=True, text=True)


def test_replay_skab_layout_writes_one_row_per_input_row(tmp_path, card):
    cfg = write_config(tmp_path, agent_config(tmp_path, 1883, hop=1, warmup=400,
                                              adapt={"drift": "none"}))
    src, out = tmp_path / "rec.csv", tmp_path / "out.csv"
    skab_csv(src, card)
    r = run("--config", str(cfg), "--csv", str(src), "--delimiter", ";", "--time-column",
            "datetime", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 540
    assert list(rows[0])[:10] == ["timestamp", *SKAB_FIELDS, "score"]
    assert rows[0]["timestamp"] == _iso(1.6e9)
    scores = np.array([float(r["score"]) for r in rows])
    alerts = np.array([int(r["alert"]) for r in rows])
    assert np.all((scores >= 0) & (scores <= 1))
    assert alerts[:500].sum() == 0 and alerts[500:].sum() >= 1
    assert np.all(scores[505:] > 0.5) and np.mean(scores[400:500] > 0.5) < 0.05
    # A replay never touches the device's real state directory.
    assert not (tmp_path / "state").exists()


def test_replay_nab_layout_with_a_model_none_stream(tmp_path):
    cfg = write_config(tmp_path, agent_config(
        tmp_path, 1883, fields=["value"], model="none", window=8, hop=1, warmup=600,
        adapt={"drift": "none", "hst_window": 100}, alert={"cooldown_s": 0}))
    src, out = tmp_path / "nab.csv", tmp_path / "out.csv"
    x = 10 + np.sin(np.arange(1400) / 20)
    x[1200:1203] += 8
    with src.open("w") as f:
        f.write("timestamp,value\n")
        f.writelines(f"{_iso(1.4e9 + 300 * i)},{v:.5f}\n" for i, v in enumerate(x))
    r = run("--config", str(cfg), "--csv", str(src), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1400 and list(rows[0])[:4] == ["timestamp", "value", "score", "alert"]
    alert_rows = [i for i, row in enumerate(rows) if row["alert"] == "1"]
    assert any(1200 <= i <= 1210 for i in alert_rows), alert_rows


def test_replay_refusals_are_clear(tmp_path, card):
    cfg = write_config(tmp_path, agent_config(tmp_path, 1883))
    src = tmp_path / "rec.csv"
    skab_csv(src, card, 100, 0)
    r = run("--config", str(cfg), "--csv", str(src), "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 1
    assert "no column 'timestamp'" in r.stderr and "delimiter ','" in r.stderr
    r = run("--config", str(cfg), "--csv", str(src), "--delimiter", ";", "--time-column",
            "datetime", "--stream", "nope", "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 1 and "no stream 'nope'" in r.stderr
    r = run("--config", str(cfg), "--csv", str(tmp_path / "missing.csv"), "--out",
            str(tmp_path / "o.csv"))
    assert r.returncode == 1 and "missing.csv" in r.stderr


def test_replay_keeps_rows_it_cannot_use_and_says_how_many(tmp_path, card):
    cfg = write_config(tmp_path, agent_config(tmp_path, 1883, adapt={"drift": "none"}))
    src, out = tmp_path / "rec.csv", tmp_path / "out.csv"
    skab_csv(src, card, 200, 0)
    lines = src.read_text().splitlines()
    lines[50] = lines[50].replace(lines[50].split(";")[3], "oops", 1)
    lines[60] = "not a time;" + lines[60].split(";", 1)[1]
    src.write_text("\n".join(lines) + "\n")
    r = run("--config", str(cfg), "--csv", str(src), "--delimiter", ";", "--time-column",
            "datetime", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "200 rows (2 skipped" in r.stdout
    assert len(list(csv.DictReader(out.open()))) == 200


# -- evaluate.py -----------------------------------------------------------------------


def _nab(windows: list[tuple[int, int]], n: int = 1000):
    return nab.NabFile("f.csv", np.arange(n, dtype=np.int64), np.zeros(n), windows)


def test_nab_scoring_null_is_0_perfect_is_100_and_false_positives_cost():
    files = [_nab([(300, 399)]), _nab([(600, 699), (800, 849)])]

    def std(dets):
        return nab.score_detections(files, dets)["standard"]

    none = [np.zeros(1000, bool) for _ in files]
    perfect = [np.zeros(1000, bool) for _ in files]
    for f, d in zip(files, perfect, strict=True):
        for s, _ in f.windows:
            d[s] = True
    assert std(none) == pytest.approx(0.0)
    assert std(perfect) == pytest.approx(100.0)
    late = [d.copy() for d in none]
    late[0][390] = True  # near the end of its window: small reward
    early = [d.copy() for d in none]
    early[0][305] = True
    assert 0 < std(late) < std(early)
    fp = [d.copy() for d in perfect]
    fp[0][200] = True  # before any window: full A_FP
    fp[1][50] = True  # inside the probationary period (150 rows): ignored
    drop = 100 - std(fp)
    assert drop > 0
    assert nab.score_detections(files, fp)["reward_low_FP_rate"] < 100 - drop
    # The sweep finds the threshold that reproduces the perfect detector.
    swept = nab.sweep(files, [d.astype(float) for d in perfect])
    assert swept["standard"].score == pytest.approx(100.0)
    assert nab.scaled_sigmoid(np.array([-1.0]))[0] == pytest.approx(0.9866, abs=1e-4)
    assert nab.scaled_sigmoid(np.array([4.0]))[0] == -1.0


def test_evaluate_runs_on_a_tiny_data_set_and_skips_cleanly_without_one(tmp_path, card):
    data = tmp_path / "data"
    (data / "skab" / "valve1").mkdir(parents=True)
    skab_csv(data / "skab" / "valve1" / "0.csv", card, 500, 100)
    (data / "nab" / "x").mkdir(parents=True)
    x = 10 + np.sin(np.arange(1200) / 20)
    x[1000:1003] += 8
    with (data / "nab" / "x" / "s.csv").open("w") as f:
        f.write("timestamp,value\n")
        f.writelines(f"{_iso(1.4e9 + 300 * i)},{v:.5f}\n" for i, v in enumerate(x))
    (data / "nab" / "combined_windows.json").write_text(json.dumps(
        {"x/s.csv": [[_iso(1.4e9 + 300 * 980) + ".000000", _iso(1.4e9 + 300 * 1040)]]}))
    script = str(REPO / "scripts" / "evaluate.py")
    r = subprocess.run([sys.executable, script, "--data", str(data), "--doc",
                        str(tmp_path / "e.md")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| edge-agent (shipped defaults) |" in r.stdout and "Conv-AE" in r.stdout
    assert "standard / low FP / low FN" in r.stdout
    assert (tmp_path / "e.md").read_text().startswith("# Detection quality")
    r = subprocess.run([sys.executable, script, "--data", str(tmp_path / "absent")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "nothing to evaluate" in r.stdout
