"""Outbox and uplink figures: commit rate, group commit, backlog drain, time to first delivery.

    .venv/bin/python scripts/bench_outbox.py [--backlog 6600] [--outage-s 20]
    .venv/bin/python scripts/bench_outbox.py --commit-only   # group vs per-event only

0. Group commit vs one commit per event, both in this run, for synchronous=FULL
   and NORMAL: the most events/s each path commits when the producer submits as
   fast as it can, the producer's own time per event (what the scoring thread
   pays), and submit-to-durable latency p50/p99 at a steady --rate (default
   1,000 events/s, the alert rate the agent must sustain).
   Then live delivery: --rate alerts/s for --live-s through the committer and
   the uplink (default replay_rate 50) to a subscriber on a real mosquitto:
   how many arrived, p50/p99 from submit to the subscriber, backlog left.
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
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import LocalBroker
from agent.config import parse_config
from agent.uplink.committer import Committer, Pending
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


ALERT_MSG = ("alert", "pump", "edge/bench/alert/pump", lambda seq: {**ALERT, "seq": seq})


def offer(n: int, rate: float, submit: Callable[[], None]) -> tuple[list[float], float]:
    """Call ``submit`` n times, at ``rate`` per second (0: back to back).

    Returns when each event arose (its slot in the schedule: a producer still busy
    with the last commit makes the next event wait, and that wait is part of its
    latency; back to back, the call's start) and the time spent inside the calls.
    """
    arose, busy = [], 0.0
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate if rate else 0.0
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = time.perf_counter()
        submit()
        busy += time.perf_counter() - t
        arose.append(due if rate else t)
    return arose, busy


def per_event(path: Path, sync: str, n: int, rate: float) -> dict[str, Any]:
    """The old path: the producer commits each event itself (one transaction, one fsync)."""
    ob = Outbox(path, synchronous=sync)
    durable: list[float] = []

    def submit() -> None:
        ob.submit([ALERT_MSG])
        durable.append(time.perf_counter())

    starts, busy = offer(n, rate, submit)
    ob.close()
    return figures(starts, durable, busy)


def grouped(path: Path, sync: str, n: int, rate: float) -> dict[str, Any]:
    """The committer: the producer queues, one thread commits all that waits at once."""
    ob = Outbox(path, synchronous=sync)
    marks: list[tuple[int, float]] = []  # (events committed so far, when)
    committer = Committer(ob, lambda: marks.append((committer.committed, time.perf_counter())))
    committer.start()
    starts, busy = offer(n, rate, lambda: committer.submit([Pending(ALERT_MSG)]))
    committer.flush()
    committer.stop()
    ob.close()
    durable, k = [], 0
    for i in range(n):  # event i is durable at the first commit that covers it
        while marks[k][0] <= i:
            k += 1
        durable.append(marks[k][1])
    return {**figures(starts, durable, busy), "groups": committer.groups}


def figures(starts: list[float], durable: list[float], busy: float) -> dict[str, Any]:
    lat = (np.array(durable) - np.array(starts)) * 1e3
    return {"rate": len(starts) / (durable[-1] - starts[0]),
            "producer_us": busy / len(starts) * 1e6,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def group_vs_single(tmp: Path, sync: str, n: int, rate: float, reps: int) -> None:
    """Print both paths' throughput and latency, medians of interleaved runs, and ratios.

    Interleaved (per-event, group, per-event, ...) so a slow spell of a shared disk
    falls on both paths alike.
    """
    runs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {"per-event": [],
                                                                      "group": []}
    for rep in range(reps):
        for name, run in (("per-event", per_event), ("group", grouped)):
            most = run(tmp / f"{name}-{sync}-{rep}-max.db", sync,
                       n * (10 if name == "group" else 1), 0)
            steady = run(tmp / f"{name}-{sync}-{rep}-steady.db", sync, n, rate)
            runs[name].append((most, steady))
    # "kept": the rate the path sustained at the steady offer (below it: fell behind).
    med = {name: {out: float(np.median([r[part][key] for r in rs]))
                  for out, part, key in (("rate", 0, "rate"), ("producer_us", 0, "producer_us"),
                                         ("p50_ms", 1, "p50_ms"), ("p99_ms", 1, "p99_ms"),
                                         ("kept", 1, "rate"))}
           for name, rs in runs.items()}
    for name, m in med.items():
        print(f"  {name:<9}  {m['rate']:>9,.0f} events/s  {m['producer_us']:>7.1f} us  "
              f"{m['p50_ms']:>8.3f} / {m['p99_ms']:.3f} ms  (kept up with "
              f"{m['kept']:,.0f} of {rate:,.0f} events/s)")
    g, p = med["group"], med["per-event"]
    print(f"  group / per-event: most events/s {g['rate'] / p['rate']:.1f}x, producer time "
          f"{g['producer_us'] / p['producer_us']:.3f}x, p99 at {rate:,.0f}/s "
          f"{g['p99_ms'] / p['p99_ms']:.2f}x")


class Arrivals:
    """A subscriber recording when each numbered alert arrived."""

    def __init__(self, port: int) -> None:
        self.at: dict[int, float] = {}
        subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"arrivals-{port}")
        self.c.on_connect = lambda c, *a: c.subscribe("edge/bench/alert/#", qos=1)
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the subscriber got no SUBACK")

    def _on(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.at[json.loads(msg.payload)["i"]] = time.perf_counter()

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def live_delivery(tmp: Path, rate: float, seconds: float) -> None:
    """Alerts at ``rate`` through committer and uplink to a subscriber; print what arrived."""
    n = int(rate * seconds)
    with LocalBroker(extra="set_tcp_nodelay true\n") as b:
        arrivals = Arrivals(b.port)
        ob = Outbox(tmp / "live.db")
        up = Uplink(config(tmp, b.port, 50.0), ob, status=dict)
        committer = Committer(ob, up.notify)
        committer.start()
        up.start()
        if not up.connected.wait(10):
            raise RuntimeError("the uplink did not connect")

        def submit(i: int) -> None:
            committer.submit([Pending(("alert", "pump", "edge/bench/alert/pump",
                                       lambda seq: {**ALERT, "seq": seq, "i": i}))])

        count = iter(range(n))
        arose, _ = offer(n, rate, lambda: submit(next(count)))
        deadline = time.monotonic() + 30
        while len(arrivals.at) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        lat = np.array([at - arose[i] for i, at in arrivals.at.items()]) * 1e3
        backlog = len(ob)
        groups = committer.groups
        up.stop(0)
        committer.stop()
        ob.close()
        arrivals.close()
    print(f"live delivery, {rate:,.0f} alerts/s for {seconds:g} s (replay_rate 50, "
          f"max_inflight 100): {len(lat):,} of {n:,} arrived, submit to subscriber "
          f"p50 {np.percentile(lat, 50):.2f} ms p99 {np.percentile(lat, 99):.2f} ms; "
          f"{n / max(groups, 1):.1f} alerts per commit; backlog after {backlog}")


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
    ap.add_argument("--events", type=int, default=2000,
                    help="events per group-vs-per-event run (x10 for the group's maximum)")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="steady events/s for the latency figures")
    ap.add_argument("--live-s", type=float, default=5.0,
                    help="seconds of live alerts at --rate through the uplink")
    ap.add_argument("--reps", type=int, default=3,
                    help="interleaved runs per path; medians are printed")
    ap.add_argument("--commit-only", action="store_true",
                    help="only the group commit vs per-event comparison")
    # Not /tmp by default: where /tmp is a tmpfs every fsync is free.
    ap.add_argument("--dir", type=Path, default=Path.cwd(),
                    help="where the scratch outboxes go (the disk the agent's state_dir is on)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-bench-outbox-", dir=args.dir))
    try:
        run(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, args: argparse.Namespace) -> None:
    print(f"commit path (alert rows), medians of {args.reps}: most events/s | producer "
          f"time per event | p50 / p99 from an event arising to its row being durable, "
          f"at {args.rate:,.0f} events/s")
    for sync in ("full", "normal"):
        print(f" synchronous={sync}")
        group_vs_single(tmp, sync, args.events, args.rate, args.reps)
    live_delivery(tmp, args.rate, args.live_s)
    sys.stdout.flush()
    if args.commit_only:
        return
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
