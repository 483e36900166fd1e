"""What each `max_delay_ms` costs and buys: windows per model call, latency, CPU.

    .venv/bin/python scripts/bench_batching.py [--rates 1000,5000] [--delays 0,1,2,5,10]
                                               [--seconds 3]

For each rate and delay, one throw-away mosquitto, an in-process agent (the
`scripts/bench.py` stream: 8 fields, window 16, hop 4, the shipped model, batch
64) and a paced publisher in its own process that stamps every reading with
its send time. The agent's observer sees every scored batch, so per setting it
prints: windows per model call, model calls per second, the sensor -> scored
latency of each window (the send time of its newest reading to the end of the
model call that scored it: broker hop, decode, ring, waiting, scoring) at p50
and p99, and the agent's CPU per message (this process's CPU time: the agent
is all that runs in it). Rows of one run compare; the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

import agent
from agent.broker import LocalBroker
from agent.config import parse_config
from agent.daemon import Agent
from agent.pipeline import ScoreBatch, StreamPipeline

FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS"]
ROW = [0.21, 0.27, 2.4, 0.11, 89.5, 28.4, 228.6, 125.1]
TOPIC = "bench/pump"
WARMUP = 400


def publish(port: int, rate: float, n: int) -> None:
    """``n`` readings at ``rate`` per second, each stamped with its send time."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-batching-pub")
    c.connect("127.0.0.1", port)
    c.loop_start()
    rng = np.random.default_rng(0)
    noise = (1 + 0.01 * rng.standard_normal((256, len(ROW)))) * ROW
    start = time.monotonic()
    for i in range(n):
        ahead = start + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        body = {"ts": time.time(), **dict(zip(FIELDS, noise[i % 256].round(3).tolist(),
                                               strict=True))}
        c.publish(TOPIC, json.dumps(body), qos=0)
    time.sleep(0.5)
    c.loop_stop()
    c.disconnect()


def cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def run(port: int, tmp: Path, rate: float, delay_ms: float, seconds: float) -> dict[str, Any]:
    raw = {
        "device_id": "bench", "state_dir": str(tmp / "state"), "log_level": "warning",
        "local": {"host": "127.0.0.1", "port": port},
        "upstream": {"host": "127.0.0.1", "port": port, "status_interval_s": 5},
        "streams": [{"name": "pump", "topic": TOPIC, "fields": FIELDS, "window": 16, "hop": 4,
                     "warmup": WARMUP, "batch": 64, "buffer": 65536, "summary_s": 0,
                     "max_delay_ms": delay_ms, "alert": {"threshold": "auto"}}],
    }
    seen: list[tuple[float, float, int]] = []  # (scored at, newest reading's send time, n)
    lock = threading.Lock()

    def observe(p: StreamPipeline, events: list[Any]) -> None:
        now = time.time()
        with lock:
            for e in events:
                if isinstance(e, ScoreBatch) and not e.warm:
                    seen.extend((now, float(t), len(e.raw)) for t in e.end_ts)

    a = Agent(parse_config(raw, base_dir=Path(agent.__file__).resolve().parent.parent),
              observer=observe)
    a.start()
    try:
        if not a.wait_connected(15):
            raise SystemExit("agent did not connect")
        warm = mp.Process(target=publish, args=(port, 5000.0, WARMUP + 100))
        warm.start()
        warm.join()
        while a.streams[0].calibrator.warm:
            time.sleep(0.05)
        with lock:
            seen.clear()
        n = int(rate * seconds)
        cpu0, samples0 = cpu_s(), a.streams[0].samples
        pub = mp.Process(target=publish, args=(port, rate, n))
        pub.start()
        pub.join()
        cpu = cpu_s() - cpu0
        got = a.streams[0].samples - samples0
    finally:
        a.stop(drain_timeout=0)
    with lock:
        lat = np.array([(s - t) * 1e3 for s, t, _ in seen])
        calls = sum(1 / k for _, _, k in seen)  # each window is 1/k of its call
    return {"rate": rate, "delay": delay_ms, "received": got, "sent": n,
            "windows": len(lat), "per_call": len(lat) / max(calls, 1e-9),
            "calls_s": calls / seconds, "p50": float(np.percentile(lat, 50)) if len(lat) else 0,
            "p99": float(np.percentile(lat, 99)) if len(lat) else 0,
            "cpu_us": cpu / max(got, 1) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="1000,5000", help="messages per second, comma-separated")
    ap.add_argument("--delays", default="0,1,2,5,10", help="max_delay_ms values")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-batching-"))
    extra = "set_tcp_nodelay true\nmax_queued_messages 0\nmax_queued_bytes 0\n"
    print("rate msg/s | max_delay_ms | received/sent | windows | windows per call | "
          "model calls/s | sensor->scored p50 / p99 ms | agent CPU us/msg")
    with LocalBroker(workdir=tmp / "broker", extra=extra) as broker:
        for rate in (float(r) for r in args.rates.split(",")):
            for i, delay in enumerate(float(d) for d in args.delays.split(",")):
                r = run(broker.port, tmp / f"{rate:.0f}-{i}", rate, delay, args.seconds)
                print(f"{r['rate']:10.0f} | {r['delay']:12g} | {r['received']:6d}/{r['sent']:<6d} "
                      f"| {r['windows']:7d} | {r['per_call']:16.1f} | {r['calls_s']:13.0f} | "
                      f"{r['p50']:8.2f} / {r['p99']:6.2f}           | {r['cpu_us']:6.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
