"""The README's screenshot: the live page of `edge-agent demo` just after its fault.

    .venv/bin/python scripts/screenshot_demo.py [--out docs/live-page.png]

Runs `edge-agent demo --no-browser` (the built-in generator, unless a SKAB
recording is next to the checkout), opens the page it prints in headless
Chromium (Debian's), waits until the injected fault's episode has opened and
closed, and saves a screenshot.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/live-page.png"))
    ap.add_argument("--speed", type=float, default=60)
    args = ap.parse_args()
    log = Path(tempfile.mkdtemp()) / "demo.txt"
    exe = Path(sys.executable).parent / "edge-agent"
    demo = subprocess.Popen([str(exe), "demo", "--no-browser", "--source", "generator",
                             "--speed", str(args.speed), "--port", "0"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (m := re.search(r"live page: (\S+)", log.read_text())):
            if time.monotonic() > deadline:
                sys.exit(log.read_text())
            time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 330})
            page.goto(m.group(1))
            sel = 'section[data-stream="pump"]'
            page.wait_for_function(f"+document.querySelector('{sel} .alerts').textContent >= 1",
                                   timeout=120_000)
            page.wait_for_selector(f'{sel} .state[data-state="normal"]', timeout=120_000)
            time.sleep(2.0)  # a little normal after the episode
            page.screenshot(path=str(args.out))
            browser.close()
        print(f"{args.out}: saved")
    finally:
        demo.terminate()
        demo.wait(30)


if __name__ == "__main__":
    main()
