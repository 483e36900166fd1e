"""The live page in a real browser (Debian's chromium through Playwright) on a real agent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import (
    AgentProcess,
    anomalous_rows,
    normal_rows,
    publish_all,
    publisher,
    write_config,
)
from .live_support import free_port, live_config

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is in the dev extra: ./scripts/setup.sh")
CHROMIUM = os.environ.get("EDGE_AGENT_CHROMIUM") or shutil.which("chromium") \
    or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian package "
                                "chromium; ./scripts/setup.sh installs it)")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "live-page.png"
STREAM = 'section[data-stream="pump"]'


def _launch(p):
    # The Debian build, never a downloaded one; no sandbox when running as root in CI.
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def test_page_follows_the_stream_the_fault_and_a_restart(tmp_path, broker, card):
    port = free_port()
    cfg = write_config(tmp_path, live_config(tmp_path, broker.port, port))
    agent = AgentProcess(cfg)
    try:
        assert agent.wait_log("live page on http"), agent.output()
        with sync_api.sync_playwright() as p:
            browser = _launch(p)
            page = browser.new_page(viewport={"width": 1100, "height": 420})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector('#conn[data-state="open"]')
            page.wait_for_selector(STREAM)
            assert page.inner_text("#device") == "dev1"
            page.wait_for_selector('#local[data-ok="true"]')
            page.wait_for_selector('#upstream[data-ok="true"]')
            assert page.inner_text(f"{STREAM} .model") == f"skab-ae v{card.version}"

            pub = publisher(broker.port)
            rows = normal_rows(card, 200)
            publish_all(pub, "sensors/pump/a", rows)
            # State, counters and chart follow: the last window's end is on the chart.
            page.wait_for_selector(f'{STREAM} .state[data-state="normal"]')
            page.wait_for_function(
                "([s, ts]) => document.querySelector(s + ' .chart').dataset.lastTs == ts",
                arg=[STREAM, str(int(rows[-1]["ts"]))])
            assert int(page.inner_text(f"{STREAM} .windows")) == (200 - 16) // 4 + 1
            assert int(page.get_attribute(f"{STREAM} .chart", "data-points")) >= 1
            before = page.eval_on_selector(f"{STREAM} canvas", "c => c.toDataURL()")

            bad = anomalous_rows(card, 40, t0=rows[-1]["ts"] + 1)
            publish_all(pub, "sensors/pump/a", bad)
            page.wait_for_selector(f'{STREAM} .state[data-state="anomaly"]')
            assert page.inner_text(f"{STREAM} .state") == "anomaly"
            page.wait_for_function(
                "s => document.querySelector(s + ' .alerts').textContent == '1'", arg=STREAM)
            page.wait_for_function(
                "([s, ts]) => document.querySelector(s + ' .chart').dataset.lastTs == ts",
                arg=[STREAM, str(int(bad[-1]["ts"]))])
            assert float(page.inner_text(f"{STREAM} .score")) > 0.5
            after = page.eval_on_selector(f"{STREAM} canvas", "c => c.toDataURL()")
            assert after != before, "the chart did not redraw"
            shot = tmp_path / "live-page.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("EDGE_AGENT_UPDATE_SCREENSHOT"):
                shutil.copy(shot, SCREENSHOT)
            pub.loop_stop()

            # A restart: the page notices, reconnects on its own and takes a new snapshot.
            assert agent.terminate() == 0
            page.wait_for_selector('#conn[data-state="reconnecting"]')
            agent = AgentProcess(cfg)
            page.wait_for_selector('body[data-snapshots="2"]', timeout=30_000)
            page.wait_for_selector('#conn[data-state="open"]')
            assert agent.wait_log("live page on http"), agent.output()
            # The restored stream keeps its state (the episode stays open) and model.
            assert page.inner_text(f"{STREAM} .model") == f"skab-ae v{card.version}"
            browser.close()
    finally:
        if agent.proc.poll() is None:
            agent.kill()
