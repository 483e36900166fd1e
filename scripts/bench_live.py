"""What the live page costs the agent, and how soon the page paints.

    .venv/bin/python scripts/bench_live.py [--messages 20000] [--frame 32] [--runs 3]
                                           [--pages 3] [--clients sse|chromium]

Runs a real `edge-agent run` (the scripts/bench.py stream: 8 channels, window
16, hop 4, the shipped model) with its health endpoint and live view on, blasts
the same load with 0 and with `--pages` pages connected to /events (alternating,
`--runs` times each), and prints the agent's ingest rate, windows scored and
dropped, CPU, and RSS after the load. `--clients sse` reads the pages' event
streams from a separate process (the browser of a Pi's operator runs on another
machine); `--clients chromium` opens real pages in headless Chromium on this one
(which then competes with the agent for the cores). Last, it loads the page in
headless Chromium against an agent with a full history and prints first paint,
first contentful paint and the time until the chart is drawn.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from bench import FIELDS, proc_stat, publish
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import LocalBroker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_events(url: str, n: int, stop: mp.Event, counts: mp.Array) -> None:  # type: ignore[valid-type]
    """`n` event-stream readers, as `n` pages would be; counts the frames each gets."""

    def one(i: int) -> None:
        with urllib.request.urlopen(url, timeout=60) as resp:
            for line in resp:
                if line.startswith(b"event:"):
                    counts[i] += 1
                if stop.is_set():
                    return

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    stop.wait()


def open_pages(url: str, n: int, stop: mp.Event, counts: mp.Array) -> None:  # type: ignore[valid-type]
    """`n` real pages in headless Chromium."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415  (only with --clients chromium)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pages = [browser.new_page() for _ in range(n)]
        for pg in pages:
            pg.goto(url)
            pg.wait_for_selector('#conn[data-state="open"]')
        while not stop.wait(0.5):
            for i, pg in enumerate(pages):
                counts[i] = int(pg.get_attribute("body", "data-snapshots") or 0)
        browser.close()


class Agent:
    """A throw-away broker and `edge-agent run` with the live page on."""

    def __init__(self, tmp: Path, points: int = 300) -> None:
        extra = "set_tcp_nodelay true\nmax_queued_messages 0\nmax_queued_bytes 0\n"
        self.broker = LocalBroker(workdir=tmp / "broker", extra=extra).start()
        self.http = free_port()
        cfg = {
            "device_id": "bench", "state_dir": str(tmp / "state"), "log_level": "warning",
            "local": {"host": "127.0.0.1", "port": self.broker.port},
            "upstream": {"host": "127.0.0.1", "port": self.broker.port,
                         "status_interval_s": 0.5},
            "service": {"health": {"port": self.http}, "live": {"points": points}},
            "streams": [{"name": "pump", "topic": "bench/pump", "fields": FIELDS, "window": 16,
                         "hop": 4, "warmup": 400, "batch": 64, "buffer": 65536,
                         "alert": {"threshold": "auto"}}],
        }
        (tmp / "agent.yaml").write_text(yaml.safe_dump(cfg))
        exe = Path(sys.executable).parent / "edge-agent"
        self.proc = subprocess.Popen([str(exe), "run", "--config", str(tmp / "agent.yaml")],
                                     stderr=subprocess.DEVNULL)
        self.status: dict = {}
        got = threading.Event()

        def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
            body = json.loads(msg.payload)
            if body.get("status") == "online":
                self.status = body
                got.set()

        self.sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-status")
        self.sub.on_message = on_message
        self.sub.connect("127.0.0.1", self.broker.port)
        self.sub.subscribe("edge/bench/status")
        self.sub.loop_start()
        if not got.wait(30):
            sys.exit("agent did not come up")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz", timeout=2)
                break
            except OSError:
                time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.sub.loop_stop()
        self.broker.close()


def load_run(pages: int, clients: str, messages: int, frame: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-bench-live-"))
    a = Agent(tmp)
    stop, counts = mp.Event(), mp.Array("i", max(1, pages))
    readers = None
    try:
        if pages:
            target = read_events if clients == "sse" else open_pages
            path = "/events" if clients == "sse" else "/"
            readers = mp.Process(target=target,
                                 args=(f"http://127.0.0.1:{a.http}{path}", pages, stop, counts))
            readers.start()
            deadline = time.monotonic() + 60
            while min(counts[:pages]) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        time.sleep(1.0)
        idle = proc_stat(a.proc.pid)
        expected = messages * frame
        pub = mp.Process(target=publish, args=(a.broker.port, messages, frame, 0))
        t0 = time.monotonic()
        pub.start()
        samples, last_change = 0, time.monotonic()
        while True:
            time.sleep(0.25)
            s = a.status["streams"]["pump"]["samples"]
            if s != samples:
                samples, last_change = s, time.monotonic()
            if samples >= expected or time.monotonic() - last_change > 3:
                break
        elapsed = last_change - t0
        pub.join()
        busy = proc_stat(a.proc.pid)
        st = a.status["streams"]["pump"]
        got = list(counts[:pages])
    finally:
        stop.set()
        if readers is not None:
            readers.join(30)
        a.close()
    return {"rate": samples / elapsed, "lost": expected - samples, "windows": st["windows"],
            "us_per_sample": (busy["cpu_s"] - idle["cpu_s"]) / max(1, samples) * 1e6,
            "dropped": st["windows_dropped"], "cpu": (busy["cpu_s"] - idle["cpu_s"]) / elapsed,
            "rss_idle": idle["VmRSS"], "rss": busy["VmRSS"], "frames": min(got) if got else 0}


def micro(batches: int = 20_000, ticks: int = 2_000) -> dict[str, float]:
    """The live view's own work, timed in-process: the observer per scored batch of 64
    windows, one tick (points, one frame encoded and queued for 3 clients), and the
    once-a-second status refresh."""
    import numpy as np  # noqa: PLC0415

    from agent.config import parse_config  # noqa: PLC0415
    from agent.daemon import Agent as RealAgent  # noqa: PLC0415
    from agent.pipeline import ScoreBatch  # noqa: PLC0415
    from agent.service.live import LiveView  # noqa: PLC0415

    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-bench-micro-"))
    cfg = parse_config({"device_id": "bench", "state_dir": str(tmp),
                        "streams": [{"name": "pump", "topic": "bench/pump", "fields": FIELDS}]})
    agent = RealAgent(cfg)
    view = LiveView(agent, cfg.service.live)
    p = agent.streams[0]
    rng = np.random.default_rng(0)
    events = [ScoreBatch("pump", np.arange(64, dtype=np.float64) + i * 64,
                         np.arange(64, dtype=np.int64), rng.random(64, dtype=np.float32),
                         rng.random(64), rng.random(64, dtype=np.float32),
                         np.zeros(64, dtype=np.int64), 1.0, False) for i in range(256)]
    t0 = time.perf_counter()
    for i in range(batches):
        view.observe(p, [events[i % 256]])
        if i % 16 == 15:
            view._hist["pump"].pending.clear()  # as the hub would, without timing it here
    observe_us = (time.perf_counter() - t0) / batches * 1e6
    clients = [view.connect() for _ in range(3)]
    t0 = time.perf_counter()
    for i in range(ticks):
        for e in events[(i * 8) % 256:(i * 8) % 256 + 8]:
            view.observe(p, [e])
        view.tick()
        for c, _ in clients:  # the handler threads' side: take the frame
            c.get(0)
    tick_us = (time.perf_counter() - t0) / ticks * 1e6
    t0 = time.perf_counter()
    for _ in range(ticks):
        view._agent_status(force=True)
    status_us = (time.perf_counter() - t0) / ticks * 1e6
    agent.outbox.close()
    return {"observe_us": observe_us, "tick_us": tick_us, "status_us": status_us}


def first_paint(runs: int) -> list[dict[str, float]]:
    """Load the page against an agent whose history is full; paint timings in ms."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415  (a dev dependency)

    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-bench-paint-"))
    a = Agent(tmp)
    out = []
    try:
        # A frame every 25 ms for 16 s: ~80 ticks of up to 4 points, a full 300-point history.
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-paced")
        c.connect("127.0.0.1", a.broker.port)
        c.loop_start()
        t0 = 1_700_000_000.0
        for i in range(640):
            body = {"ts": [t0 + i * 32 + k for k in range(32)],
                    **{f: [0.1 * j + 1e-3 * ((i * 32 + k) % 7) for k in range(32)]
                       for j, f in enumerate(FIELDS)}}
            c.publish("bench/pump", json.dumps(body))
            time.sleep(0.025)
        time.sleep(1.0)
        c.loop_stop()
        c.disconnect()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            for _ in range(runs):
                ctx = browser.new_context()  # a cold cache each time
                page = ctx.new_page()
                page.goto(f"http://127.0.0.1:{a.http}/")
                page.wait_for_function("document.querySelector('.chart') && "
                                       "+document.querySelector('.chart').dataset.points > 0")
                t = page.evaluate("""() => {
                    const p = {};
                    for (const e of performance.getEntriesByType('paint')) p[e.name] = e.startTime;
                    p.chart = performance.now();
                    p.points = +document.querySelector('.chart').dataset.points;
                    return p; }""")
                out.append(t)
                ctx.close()
            browser.close()
    finally:
        a.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--frame", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pages", type=int, default=3)
    ap.add_argument("--clients", choices=["sse", "chromium"], default="sse")
    ap.add_argument("--paint-runs", type=int, default=5)
    ap.add_argument("--micro-only", action="store_true", help="only the in-process timings")
    args = ap.parse_args()

    m = micro()
    # At the frame load above (~80k samples/s = 20k windows/s, batches of 64: ~310 batches/s).
    print(f"live view in-process: observer {m['observe_us']:.1f} us per scored batch of 64 "
          f"windows; one tick with 3 clients (8 batches folded, 1 frame) "
          f"{m['tick_us']:.0f} us, status refresh (once a second) {m['status_us']:.0f} us -> "
          f"at 310 batches/s and 5 ticks/s "
          f"{(310 * m['observe_us'] + 5 * m['tick_us'] + m['status_us']) / 1e4:.2f} % of one "
          "core")
    if args.micro_only:
        return

    results: dict[int, list[dict[str, float]]] = {0: [], args.pages: []}
    for _ in range(args.runs):
        for pages in (0, args.pages):
            r = load_run(pages, args.clients, args.messages, args.frame)
            results[pages].append(r)
            print(f"  {pages} page(s): {r['rate']:,.0f} samples/s, lost {r['lost']}, windows "
                  f"{r['windows']:.0f} (dropped {r['dropped']:.0f}), CPU {r['cpu']:.0%} "
                  f"({r['us_per_sample']:.2f} us/sample), "
                  f"RSS {r['rss_idle']:.1f} -> {r['rss']:.1f} MiB, frames/page {r['frames']}",
                  flush=True)
    print(f"\nload: {args.messages} messages x {args.frame} samples, QoS 0; pages: "
          f"{args.clients}")
    base = results[0]
    for pages, rs in results.items():
        rate = statistics.median(r["rate"] for r in rs)
        rss = statistics.median(r["rss"] for r in rs)
        cpu = statistics.median(r["us_per_sample"] for r in rs)
        each = ", ".join(f"{r['rate'] / 1000:.0f}k" for r in rs)
        line = (f"{pages} page(s): median {rate:,.0f} samples/s ({each}), "
                f"agent CPU median {cpu:.2f} us/sample, RSS after load median {rss:.1f} MiB")
        if pages:
            b_rate = statistics.median(r["rate"] for r in base)
            b_rss = statistics.median(r["rss"] for r in base)
            b_cpu = statistics.median(r["us_per_sample"] for r in base)
            paired = [(r["rate"] - b["rate"]) / b["rate"] for r, b in zip(rs, base, strict=True)]
            line += (f"; vs none: rate {(rate - b_rate) / b_rate:+.1%} (paired runs: "
                     f"{', '.join(f'{d:+.1%}' for d in paired)}), CPU/sample "
                     f"{(cpu - b_cpu) / b_cpu:+.1%}, RSS {(rss - b_rss) / b_rss:+.1%}")
        print(line)
    if CHROMIUM is None:
        print("first paint: skipped (no chromium on PATH)")
        return
    paints = first_paint(args.paint_runs)
    for key, name in (("first-paint", "first paint"),
                      ("first-contentful-paint", "first contentful paint"),
                      ("chart", "chart drawn (snapshot received)")):
        vals = [p[key] for p in paints if key in p]
        print(f"{name}: median {statistics.median(vals):.0f} ms "
              f"({', '.join(f'{v:.0f}' for v in vals)}) over {len(vals)} cold loads, "
              f"{paints[0]['points']} points")


if __name__ == "__main__":
    main()
