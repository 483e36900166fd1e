"""`edge-agent watch` against a running `edge-agent run`: from /events and from the broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import AgentProcess, anomalous_rows, normal_rows, publish_all, publisher, wait_until
from .live_support import free_port, live_config

EXE = str(Path(sys.executable).parent / "edge-agent")


def _frames(path: Path) -> list[str]:
    """The plain frames watch printed, each ended by its `-- HH:MM:SS` line."""
    text = path.read_text(errors="replace")
    return [f for f in text.split("\n-- ")[:-1] if f.strip()]


def _row(frame: str, stream: str) -> str:
    return next((line for line in frame.splitlines() if line.strip().startswith(stream + " ")),
                "")


def _run_watch(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / f"watch-{len(list(tmp_path.glob('watch-*')))}.txt"
    proc = subprocess.Popen([EXE, "watch", "--interval", "0.2", *args],
                            stdout=out.open("wb"), stderr=subprocess.STDOUT)
    return proc, out


def _feed_and_check(tmp_path, broker, card, watch_args, agent_cfg):
    import yaml

    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(agent_cfg))
    agent = AgentProcess(cfg_path)
    watch = None
    try:
        assert agent.wait_log("subscribed to"), agent.output()
        watch, out = _run_watch(tmp_path, *watch_args(cfg_path))
        pub = publisher(broker.port)
        rows = normal_rows(card, 200)
        publish_all(pub, "sensors/pump/a", rows)
        assert wait_until(lambda: any("normal" in _row(f, "pump") for f in _frames(out)),
                          timeout=15), \
            out.read_text()[-3000:]
        row = _row(_frames(out)[-1], "pump")
        assert "skab-ae v1" in row
        publish_all(pub, "sensors/pump/a", anomalous_rows(card, 40, t0=rows[-1]["ts"] + 1))
        assert wait_until(lambda: any("ANOMALY" in _row(f, "pump") for f in _frames(out)),
                          timeout=15), \
            out.read_text()[-3000:]
        frame = next(f for f in _frames(out) if "ANOMALY" in _row(f, "pump"))
        # The sparkline reached the top block: the fault's score is above the threshold.
        assert "█" in _row(frame, "pump")
        pub.loop_stop()
        return out
    finally:
        if watch is not None:
            watch.terminate()
            watch.wait(timeout=10)
        agent.terminate()


def test_watch_follows_the_agents_events(tmp_path, broker, card):
    port = free_port()
    cfg = live_config(tmp_path, broker.port, port)
    out = _feed_and_check(tmp_path, broker, card, lambda p: ["--config", str(p)], cfg)
    first = _frames(out)[0]
    assert "local up" in first or "DISCONNECTED" in first
    assert any("upstream up" in f and "live" in f for f in _frames(out))


def test_watch_follows_a_device_through_the_broker(tmp_path, broker, card):
    cfg = live_config(tmp_path, broker.port, 0)
    cfg["homeassistant"] = {"enabled": True, "score_interval_s": 0.2}  # its state topic: scores
    _feed_and_check(tmp_path, broker, card,
                    lambda p: ["--broker", f"127.0.0.1:{broker.port}", "--device", "dev1"], cfg)
