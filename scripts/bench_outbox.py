"""Outbox and uplink figures: commit rate, backlog drain rate, time to first delivery.

    .venv/bin/python scripts/bench_outbox.py [--backlog 6600] [--outage-s 20]

1. Commit rate of alert-sized rows into a fresh outbox, one transaction per
   message vs batches of 100, for synchronous=FULL and NORMAL.
2. Drain: an outbox pre-filled with the backlog a 10-minute outage leaves
   (default 6600 rows: 10 streams x 1 summary/s + 1 alert/s), then the uplink
   connects to a fresh mosquitto; messages/s until the last PUBACK, with the
   replay rate limit lifted (capacity) and at the default 50/s.
3. Broker away for --outage-s while the uplink retries with the default
   backoff (1 s doubling, capped at 30 s, jittered), then back: time from the
   broker accepting connections to the first backlog message at a subscriber.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import LocalBroker
from agent.config import parse_config
from agent.uplink.outbox import Outbox
from agent.uplink.uplink import Uplink

ALERT = {"device": "bench", "stream": "pump", "ts": 1.7e9, "score": 12.3456,
         "threshold": 3.21, "model": "skab-ae", "model_version": 1, "window": 16}


def commit_rate(tmp: Path, synchronous: str, n: int, batch: int) -> float:
    ob = Outbox(tmp / f"c-{synchronous}-{batch}.db", synchronous=synchronous)
    t = time.perf_counter()
    for _ in range(n // batch):
        ob.put_many([("alert", "pump", "edge/bench/alert/pump",
                      lambda seq: {**ALERT, "seq": seq})] * batch)
    dt = time.perf_counter() - t
    ob.close()
    return n / dt


def fill(path: Path, rows: int) -> None:
    ob = Outbox(path, synchronous="normal")
    msgs = []
    for i in range(rows):
        kind = "alert" if i % 11 == 0 else "summary"
        msgs.append((kind, f"s{i % 10}", f"edge/bench/{kind}/s{i % 10}",
                     lambda seq: {**ALERT, "seq": seq, "pad": "x" * 300}))
    for k in range(0, rows, 500):
        ob.put_many(msgs[k:k + 500])
    ob.close()


class Counter:
    def __init__(self, port: int) -> None:
        self.n = 0
        self.first: float | None = None
        self.last = 0.0
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"count-{port}")
        self.c.on_message = self._on
        self.c.on_connect = lambda c, *a: c.subscribe("edge/bench/+/#", qos=1)
        self.c.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.c.connect_async("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        if b'"seq"' in msg.payload:
            self.n += 1
            self.first = self.first or now
            self.last = now

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def config(tmp: Path, port: int, replay_rate: float) -> Any:
    return parse_config({
        "device_id": "bench", "state_dir": str(tmp),
        "local": {"port": port},
        "upstream": {"host": "127.0.0.1", "port": port, "replay_rate": replay_rate,
                     "max_inflight": 100, "status_interval_s": 3600},
        "streams": [{"name": "pump", "topic": "x", "fields": ["a"], "format": "float",
                     "window": 16, "model": "skab-ae"}],
    })


def drain(tmp: Path, rows: int, replay_rate: float) -> tuple[float, int]:
    path = tmp / f"drain-{replay_rate}.db"
    fill(path, rows)
    with LocalBroker(extra="set_tcp_nodelay true\nmax_queued_messages 0\n") as b:
        counter = Counter(b.port)
        time.sleep(0.5)
        ob = Outbox(path, synchronous="full")
        up = Uplink(config(tmp, b.port, replay_rate), ob, status=dict)
        t = time.monotonic()
        up.start()
        while len(ob) and time.monotonic() - t < 600:
            time.sleep(0.05)
        dt = time.monotonic() - t
        up.stop(0)
        ob.close()
        time.sleep(0.3)
        counter.close()
    return rows / dt, counter.n


def time_to_first(tmp: Path, outage_s: float) -> tuple[float, float]:
    path = tmp / "ttf.db"
    fill(path, 100)
    b = LocalBroker(extra="set_tcp_nodelay true\n")
    b.start()
    counter = Counter(b.port)
    time.sleep(0.3)
    b.stop()
    ob = Outbox(path)
    cfg = config(tmp, b.port, 50)
    up = Uplink(cfg, ob, status=dict)
    up.start()  # the broker is away: the uplink backs off and retries
    time.sleep(outage_s)
    b.start()
    back = time.monotonic()
    while counter.first is None and time.monotonic() - back < 120:
        time.sleep(0.01)
    first = (counter.first or float("nan")) - back
    up.stop(0)
    ob.close()
    counter.close()
    b.close()
    return first, cfg.upstream.reconnect_max_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backlog", type=int, default=6600)
    ap.add_argument("--outage-s", type=float, default=20.0)
    ap.add_argument("--commits", type=int, default=2000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-bench-outbox-"))
    print("outbox commit rate (alert rows, 1 transaction each vs batches of 100):")
    for sync in ("full", "normal"):
        single = commit_rate(tmp, sync, args.commits, 1)
        batched = commit_rate(tmp, sync, args.commits * 10, 100)
        print(f"  synchronous={sync:<6}  single {single:>9,.0f} msg/s   "
              f"batched {batched:>9,.0f} msg/s")
    for rate in (100_000.0, 50.0):
        # At the default rate the full backlog would take minutes; 2000 shows the pace.
        rows = min(args.backlog, 2000) if rate == 50.0 else args.backlog
        r, got = drain(tmp, rows, rate)
        label = "no rate limit" if rate > 1000 else f"replay_rate={rate:g}"
        print(f"drain of a {rows}-message backlog ({label}): {r:,.0f} msg/s "
              f"({got} received by the subscriber)")
    first, cap = time_to_first(tmp, args.outage_s)
    print(f"broker back after a {args.outage_s:g} s outage -> first backlog message at the "
          f"subscriber after {first:.2f} s (reconnect backoff 1 s doubling, cap {cap:g} s "
          f"jittered)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
