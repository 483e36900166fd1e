"""`edge-agent demo` serves the live page while the replay runs; --headless does not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import wait_until
from .live_support import SseReader, free_port

EXE = str(Path(sys.executable).parent / "edge-agent")


def _demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "demo.txt"
    proc = subprocess.Popen([EXE, "demo", "--source", "generator", *args],
                            stdout=out.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    return proc, out


def test_demo_prints_the_url_and_serves_the_page_during_the_replay(tmp_path):
    proc, out = _demo(tmp_path, "--no-browser", "--speed", "300", "--limit", "900",
                      "--port", str(free_port()))
    try:
        assert wait_until(lambda: "live page: http" in out.read_text(), timeout=15), out.read_text()
        url = re.search(r"live page: (http://\S+)", out.read_text()).group(1)
        sse = SseReader(url + "events")
        assert sse.wait_for(lambda s: s.of("snapshot"))
        assert sse.of("snapshot")[0]["device"] == "demo-pump"
        # The replay goes on while the page watches: scored windows arrive as points.
        assert sse.wait_for(lambda s: any(u["streams"]["pump"].get("points")
                                          for u in s.of("update")), timeout=20)
        sse.close()
        assert proc.wait(timeout=60) == 0, out.read_text()
        assert "summary" in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_headless_demo_has_no_page(tmp_path):
    proc, out = _demo(tmp_path, "--headless", "--speed", "1000", "--limit", "500")
    assert proc.wait(timeout=60) == 0, out.read_text()
    text = out.read_text()
    assert "live page" not in text and "windows scored" in text
