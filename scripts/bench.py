"""The benchmark of edge-agent: every figure of issue 13, with its reference, in one run.

    .venv/bin/python scripts/bench.py            # the full run (4-6 minutes)
    .venv/bin/python scripts/bench.py --quick    # every section, short steps (under a minute)
    .venv/bin/python scripts/bench.py --cpus 1   # the agent and the references on one core

One throw-away mosquitto serves every section, so each figure of the agent has
its reference measured minutes apart on the same broker and cores:

* start-up: process start to systemd's READY=1, idle RSS, the default config;
* sustained ingest: the highest rate of single-reading JSON messages (QoS 0)
  that passes a step of ``--step-s`` seconds with 0 lost, 0 windows dropped and
  everything counted within 1 s of the last send, found by bisection, for the
  agent and for a bare paho subscriber that only runs ``json.loads``;
* framed ingest: samples/s of a burst of JSON frames and of f32 binary frames
  (the header documented in the README; an agent build without ``format: f32``
  is reported as such);
* sensor -> alert latency at 1,000 msg/s with alerts flowing (an episode every
  0.12 s for 40 s: about 580 alert messages, the p99 with its 95 % confidence
  interval), against a paho relay with TCP_NODELAY (sensor -> broker -> relay
  -> broker -> subscriber, the same two hops an alert takes); the fsync time of
  the disk meanwhile, which every alert pays before it is published;
* 1,000 alert messages/s (alert + resolved on the alert topic) delivered to a
  cloud subscriber, and the outbox backlog's growth;
* many streams: 50 streams at 200 Hz on one core, or the rate where it stops;
* per-stage cost: decode, ring, score, commit, timed in this process by driving
  the agent's own classes on the same payloads.

The load comes from a raw-socket MQTT publisher in a child process (a few
hundred nanoseconds a message, so the generator is not what saturates the two
shared cores). The agent's counters come from its retained status, refreshed
every 0.25 s: drain times are rounded up to that. The last section prints each
target of the issue as a ratio of figures from this run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import LocalBroker

FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS"]
# SKAB valve1's operating point (the shipped model's training data) and a spread.
MEAN = np.array([0.21, 0.27, 2.4, 0.11, 89.5, 28.4, 228.6, 125.1])
SPREAD = np.array([0.005, 0.005, 0.3, 0.01, 0.6, 0.5, 2.0, 1.5])
# The f32 frame header fixed by the lead for issue 13: version, flags, channels,
# t0 (unix s), period (s); the body is n x channels little-endian float32, sample-major.
F32_HEADER = struct.Struct("<BBHdf")
STATUS_INTERVAL_S = 0.25
DRAIN_LIMIT_S = 1.0
FORK = mp.get_context("fork")


# -- output ---------------------------------------------------------------------------

def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def say(line: str) -> None:
    print(f"   {line}", flush=True)


def k(x: float) -> str:
    """A rate the way the issue writes it: 8.5k, 1.02M."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


# -- payloads -------------------------------------------------------------------------

def reading_fields(values: np.ndarray) -> bytes:
    """The part of a reading after its timestamp: built once per row, not per message."""
    body = ", ".join(f'"{f}": {v:.6g}' for f, v in zip(FIELDS, values, strict=True))
    return f", {body}}}".encode()


def reading_json(ts: float, values: np.ndarray | bytes) -> bytes:
    """One 8-field reading as a sensor sends it (about 220 bytes)."""
    rest = values if isinstance(values, bytes) else reading_fields(values)
    return b'{"ts": %.6f' % ts + rest


def frame_json(t0: float, period: float, values: np.ndarray) -> bytes:
    """A JSON frame: one list per field and a list of timestamps."""
    n = values.shape[0]
    body = {"ts": [round(t0 + i * period, 6) for i in range(n)],
            **{f: [float(f"{v:.6g}") for v in values[:, j]] for j, f in enumerate(FIELDS)}}
    return json.dumps(body).encode()


def frame_f32(t0: float, period: float, values: np.ndarray) -> bytes:
    """An f32 binary frame: the 16-byte header, then the samples row by row."""
    return (F32_HEADER.pack(1, 0, values.shape[1], t0, period)
            + np.ascontiguousarray(values, dtype="<f4").tobytes())


def normal_rows(n: int, seed: int = 0, noise: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return MEAN + SPREAD * noise * rng.standard_normal((n, len(FIELDS)))


ANOMALY = MEAN + SPREAD * 200.0  # far outside anything the warm-up saw


# -- a raw MQTT publisher: the load generator -------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH at QoS 0: fixed header, topic, payload."""
    rest = struct.pack("!H", len(topic)) + topic + payload
    return b"\x30" + _varint(len(rest)) + rest


def raw_connect(port: int, client_id: str) -> socket.socket:
    """Connect with clean session and no keep-alive; return once CONNACK accepted it."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack("!H", len(cid)) + cid
    s.sendall(b"\x10" + _varint(len(var)) + var)
    ack = s.recv(4)
    if len(ack) != 4 or ack[0] != 0x20 or ack[3] != 0:
        raise RuntimeError(f"broker refused the load generator: {ack!r}")
    return s


Packet = Callable[[int], bytes]


@dataclass
class LoadResult:
    sent: int
    start: float  # time.monotonic() of the first send (the same clock in every process)
    end: float

    def rate(self) -> float:
        return self.sent / max(self.end - self.start, 1e-9)


def _load_child(conn: Any, port: int, packet: Packet, count: int, rate: float) -> None:
    s = raw_connect(port, f"bench-load-{os.getpid()}")
    start = time.monotonic()
    sent = 0
    while sent < count:
        if rate <= 0:  # a burst: as fast as the socket takes it
            due = min(count, sent + 256)
        else:
            due = min(count, int((time.monotonic() - start) * rate) + 1)
            if due <= sent:
                time.sleep(max(0.0, sent / rate - (time.monotonic() - start)))
                continue
        s.sendall(b"".join(packet(i) for i in range(sent, due)))
        sent = due
    end = time.monotonic()
    s.sendall(b"\xe0\x00")  # DISCONNECT: the broker delivers what it read first
    s.close()
    conn.send((sent, start, end))


def start_load(port: int, packet: Packet, count: int,
               rate: float = 0.0) -> Callable[[], LoadResult]:
    """Send ``count`` packets from a child process at ``rate`` per second (0: a burst);
    returns the call that waits for the result."""
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_load_child, args=(child, port, packet, count, rate))
    p.start()

    def result() -> LoadResult:
        sent, start, end = parent.recv()
        p.join()
        return LoadResult(sent, start, end)

    return result


def run_load(port: int, packet: Packet, count: int, rate: float = 0.0) -> LoadResult:
    """start_load, waited for."""
    return start_load(port, packet, count, rate)()


# -- processes --------------------------------------------------------------------------

def rss_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, v = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(v.split()[0]) / 1024
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def paho_client(name: str, port: int, nodelay: bool = True) -> mqtt.Client:
    """A connected paho client with its network loop running (TCP_NODELAY by default)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port)
    if nodelay:
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"{name}: no CONNACK")
    return c


def subscribe(c: mqtt.Client, topic: str, qos: int) -> None:
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.subscribe(topic, qos)
    if not done.wait(10):
        raise RuntimeError(f"no SUBACK for {topic}")


class Status:
    """The agent's retained status messages, each with the time it arrived."""

    def __init__(self, port: int, device: str) -> None:
        self.latest: dict[str, Any] = {}
        self.at = 0.0
        # (arrival, body) of the last statuses: rates between two of them, in the middle of
        # a burst, are free of the 0.25 s a start or an end is rounded to.
        self.history: collections.deque[tuple[float, dict[str, Any]]] = \
            collections.deque(maxlen=4096)
        self._cond = threading.Condition()
        self.client = paho_client(f"bench-status-{device}", port)
        self.client.on_message = self._on_message
        subscribe(self.client, f"edge/{device}/status", 1)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        if body.get("status") == "online":
            with self._cond:
                self.latest, self.at = body, time.monotonic()
                self.history.append((self.at, body))
                self._cond.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool],
             timeout: float) -> tuple[float, dict[str, Any]] | None:
        """The first status (arrival time, body) that satisfies ``pred``, or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self.latest and pred(self.latest)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.at, self.latest

    def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """A status published after this call (counters fresher than the last one)."""
        after = self.at
        with self._cond:
            self._cond.wait_for(lambda: self.at > after, timeout)
            return self.latest

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class AgentUnsupported(Exception):
    """The agent refused the config at start (exit 78): a feature this build lacks."""


@dataclass
class Agent:
    """A real ``edge-agent run`` as systemd would start it, with its status subscribed."""

    proc: subprocess.Popen[bytes]
    status: Status
    ready_s: float
    log: Path
    streams: list[str] = field(default_factory=list)
    window: int = 16  # the default stream's window and hop
    hop: int = 4

    def counters(self, body: dict[str, Any] | None = None) -> dict[str, int]:
        """Samples, windows scored and windows dropped, summed over the streams."""
        streams = (body or self.status.latest)["streams"]
        return {key: sum(int(streams[s][key]) for s in self.streams)
                for key in ("samples", "windows", "windows_dropped")}

    def caught_up(self, body: dict[str, Any], samples: int) -> bool:
        """``samples`` counted in all, and every stream's ready windows scored or dropped."""
        streams = body["streams"]
        if sum(int(streams[s]["samples"]) for s in self.streams) < samples:
            return False
        return all(int(streams[s]["windows"]) + int(streams[s]["windows_dropped"])
                   >= (int(streams[s]["samples"]) - self.window) // self.hop + 1
                   for s in self.streams)

    def stop(self) -> None:
        """SIGKILL: what was measured is in; a clean stop would spend seconds delivering a
        backlog nobody measures (its state directory is thrown away)."""
        self.status.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Bench:
    """One broker, one work directory, the options; starts agents and references."""

    def __init__(self, args: argparse.Namespace, work: Path, broker: LocalBroker) -> None:
        self.args = args
        self.work = work
        self.port = broker.port
        self.pin = [0] if args.cpus else None
        self.exe = Path(sys.executable).parent / "edge-agent"

    def pin_argv(self, cpus: list[int] | None) -> list[str]:
        if cpus is None:
            return []
        if shutil.which("taskset") is None:
            sys.exit("--cpus needs taskset (util-linux)")
        return ["taskset", "-c", ",".join(map(str, cpus))]

    def config(self, device: str, streams: list[dict[str, Any]],
               **upstream: Any) -> dict[str, Any]:
        return {
            "device_id": device, "state_dir": str(self.work / device), "log_level": "warning",
            "local": {"host": "127.0.0.1", "port": self.port},
            "upstream": {"host": "127.0.0.1", "port": self.port,
                         "status_interval_s": STATUS_INTERVAL_S, **upstream},
            "streams": streams,
        }

    def start_agent(self, cfg: dict[str, Any], cpus: list[int] | None = None) -> Agent:
        """Start an agent, wait for READY=1; AgentUnsupported if it refuses the config."""
        device = cfg["device_id"]
        path = self.work / f"{device}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log = self.work / f"{device}.log"
        sock_path = self.work / f"{device}.notify"
        sock_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(0.1)
        status = Status(self.port, device)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        with log.open("wb") as out:
            t0 = time.monotonic()
            proc = subprocess.Popen([*self.pin_argv(cpus), str(self.exe), "run", "--config",
                                     str(path)], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            ready_s = self._wait_ready(proc, sock, t0, log)
        except BaseException:
            status.close()
            if proc.poll() is None:
                proc.kill()
            raise
        finally:
            sock.close()
        agent = Agent(proc, status, ready_s, log, [s["name"] for s in cfg["streams"]])
        if status.wait(lambda b: True, 10) is None:
            agent.stop()
            raise RuntimeError(f"agent {device} published no status")
        return agent

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes], sock: socket.socket, t0: float,
                    log: Path) -> float:
        deadline = t0 + 120
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in sock.recv(4096):
                    return time.monotonic() - t0
            except TimeoutError:
                pass
            rc = proc.poll()
            if rc is not None:
                text = log.read_text(errors="replace").strip()
                if rc == 78:
                    raise AgentUnsupported(text.splitlines()[0] if text else "exit 78")
                raise RuntimeError(f"agent exited with {rc}: {text[-800:]}")
        raise RuntimeError("agent not ready within 120 s")


def stream(name: str, topic: str, **overrides: Any) -> dict[str, Any]:
    """A stream with the default settings (the shipped model), as a user writes it."""
    return {"name": name, "topic": topic, "fields": FIELDS, **overrides}


# -- counters under load ----------------------------------------------------------------

@dataclass
class Trial:
    """One step of a sustained-rate search."""

    rate: float
    sent: int
    counted: int
    dropped: int
    drain_s: float | None  # None: not everything was counted within the grace period
    generator_rate: float
    cpu_s: float = 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.counted

    def ok(self) -> bool:
        return (self.lost == 0 and self.dropped == 0 and self.drain_s is not None
                and self.drain_s <= DRAIN_LIMIT_S)

    def describe(self) -> str:
        drain = "not drained" if self.drain_s is None else f"drained in {self.drain_s:.2f} s"
        gen = "" if self.generator_rate >= 0.97 * self.rate else \
            f", generator reached only {k(self.generator_rate)}/s"
        return (f"{k(self.rate):>7}/s: {self.counted}/{self.sent} counted, {self.lost} lost, "
                f"{self.dropped} windows dropped, {drain}{gen} -> "
                f"{'pass' if self.ok() else 'FAIL'}")


def bisect(trial: Callable[[float], Trial], hi: float, steps: int,
           ceiling: float | None = None) -> tuple[float, list[Trial]]:
    """The highest passing rate: ``hi`` first, then halving the interval ``steps`` times
    (between ``hi`` and ``ceiling`` when ``hi`` passes, below it when it fails)."""
    done = [trial(hi)]
    say(done[-1].describe())
    if done[-1].ok():
        if ceiling is None or ceiling <= hi:
            return hi, done
        good, bad = hi, ceiling
    else:
        good, bad = 0.0, hi
    for _ in range(steps):
        mid = (good + bad) / 2
        done.append(trial(mid))
        say(done[-1].describe())
        if done[-1].ok():
            good = mid
        else:
            bad = mid
    return good, done


def reading_packets(topic: str, seed: int = 0) -> Packet:
    """Single readings stamped with the wall clock when built, cycling 512 value rows."""
    rows = [reading_fields(r) for r in normal_rows(512, seed, noise=0.3)]
    t = topic.encode()

    def packet(i: int) -> bytes:
        return publish_packet(t, reading_json(time.time(), rows[i % 512]))

    return packet


# -- sections ---------------------------------------------------------------------------

@dataclass
class Results:
    figures: dict[str, Any] = field(default_factory=dict)


def start_up(b: Bench, res: Results) -> Agent:
    """Start the default-config agent a few times; keep the last one for the ingest search."""
    section("start-up and idle memory (default config: one stream, the shipped model)")
    runs = 1 if b.args.quick else 3
    ready, idle = [], []
    agent = None
    for i in range(runs):
        agent = b.start_agent(b.config(f"bench-{i}", [stream("pump", "bench/pump")]), b.pin)
        time.sleep(1.0 if b.args.quick else 2.0)
        ready.append(agent.ready_s)
        idle.append(rss_mib(agent.proc.pid)["VmRSS"])
        say(f"run {i + 1}: start to READY=1 {agent.ready_s:.2f} s, idle RSS {idle[-1]:.1f} MiB")
        if i < runs - 1:
            agent.stop()
    assert agent is not None
    res.figures["ready_s"] = statistics.median(ready)
    res.figures["idle_mib"] = statistics.median(idle)
    say(f"median of {runs}: start to ready {res.figures['ready_s']:.2f} s, "
        f"idle RSS {res.figures['idle_mib']:.1f} MiB")
    return agent


def _ref_child(port: int, topic: str, count: Any, first: Any, last: Any, ready: Any,
               stop: Any, cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-ref-{os.getpid()}")
    loads, mono = json.loads, time.monotonic

    def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        loads(msg.payload)
        if not count.value:
            first.value = mono()
        count.value += 1
        last.value = mono()

    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.connect("127.0.0.1", port)
    c.subscribe(topic, 0)
    c.loop_start()
    stop.wait()
    c.loop_stop()
    c.disconnect()


class Reference:
    """A bare paho subscriber in its own process that only runs json.loads per message."""

    def __init__(self, b: Bench, topic: str) -> None:
        self.count = FORK.Value("q", 0, lock=False)
        self.first = FORK.Value("d", 0.0, lock=False)
        self.last = FORK.Value("d", 0.0, lock=False)
        ready, self._stop = FORK.Event(), FORK.Event()
        self.proc = FORK.Process(target=_ref_child, args=(
            b.port, topic, self.count, self.first, self.last, ready, self._stop, b.pin))
        self.proc.start()
        if not ready.wait(10):
            raise RuntimeError("reference subscriber did not subscribe")

    def close(self) -> None:
        self._stop.set()
        self.proc.join(10)


@dataclass
class Subject:
    """What a sustained-rate search reads of the process under test."""

    counted: Callable[[], tuple[int, int]]  # (messages or samples counted, windows dropped)
    wait_count: Callable[[int, float], float | None]  # time the count reached N, or None
    cpu: Callable[[], float]
    expect: int | None = None  # the count once everything sent so far is through


def settle(counted: Callable[[], tuple[int, int]], expect: int | None = None,
           limit_s: float = 120.0) -> tuple[int, int]:
    """Wait until the backlog of a failed step is through: the count reached ``expect``
    and stopped moving, or nothing more arrived for 3 s (what is missing then is lost)."""
    last, still = counted(), time.monotonic()
    deadline = still + limit_s
    while time.monotonic() < deadline:
        quiet = 0.6 if expect is None or last[0] >= expect else 3.0
        if time.monotonic() - still >= quiet:
            break
        time.sleep(0.1)
        now = counted()
        if now != last:
            last, still = now, time.monotonic()
    return last


def reference_subject(counter: Reference, pid: int) -> Subject:
    """A process whose messages a Reference subscriber counts, as a bisection subject
    (the bare paho reference, Node-RED): nothing of it drops windows."""

    def wait_count(target: int, until: float) -> float | None:
        while time.monotonic() < until:
            if counter.count.value >= target:
                return counter.last.value
            time.sleep(0.01)
        return None

    return Subject(lambda: (counter.count.value, 0), wait_count, lambda: cpu_s(pid))


def agent_subject(agent: Agent) -> Subject:
    """The agent as a bisection subject: samples counted and windows dropped, from its
    retained status."""

    def counted() -> tuple[int, int]:
        c = agent.counters(agent.status.next())
        return c["samples"], c["windows_dropped"]

    def wait_count(target: int, until: float) -> float | None:
        got = agent.status.wait(lambda body: agent.caught_up(body, target),
                                max(0.0, until - time.monotonic()))
        return None if got is None else got[0]

    return Subject(counted, wait_count, lambda: cpu_s(agent.proc.pid))


def _counted_trial(rate: float, seconds: float, load: Callable[[int, float], LoadResult],
                   subject: Subject) -> Trial:
    """Run a paced load and judge it: lost, dropped, and how long the count took to catch up.

    Lost is counted once the counters stop moving: a late message is late, not lost.
    """
    c0, d0 = settle(subject.counted, subject.expect)
    cpu0 = subject.cpu()
    n = max(1, round(rate * seconds))
    r = load(n, rate)
    subject.expect = c0 + r.sent
    at = subject.wait_count(subject.expect, r.end + DRAIN_LIMIT_S + 2.0)
    cpu1 = subject.cpu()
    c1, d1 = subject.counted() if at is not None else settle(subject.counted, subject.expect)
    return Trial(rate, r.sent, c1 - c0, d1 - d0, None if at is None else max(0.0, at - r.end),
                 r.rate(), cpu1 - cpu0)


def reference_section(b: Bench, res: Results) -> None:
    section("reference: bare paho receive + json.loads (same broker, same payloads)")
    ref = Reference(b, "bench/ref")
    packet = reading_packets("bench/ref")
    try:
        n = 20_000 if b.args.quick else 200_000
        before = ref.count.value
        r = run_load(b.port, packet, n)
        deadline = time.monotonic() + 30
        while ref.count.value - before < n and time.monotonic() < deadline:
            time.sleep(0.05)
        got = ref.count.value - before
        burst = got / max(ref.last.value - ref.first.value, 1e-9)
        say(f"burst of {n} messages (sent at {k(r.rate())}/s): {got} received at "
            f"{k(burst)} msg/s")

        subject = reference_subject(ref, ref.proc.pid)

        def trial(rate: float) -> Trial:
            return _counted_trial(rate, b.args.step_s,
                                  lambda cnt, rt: run_load(b.port, packet, cnt, rt), subject)

        say(f"sustained: {b.args.step_s:g} s steps, bisection from the burst rate")
        rate, _ = bisect(trial, round(burst, -2), b.args.steps)
    finally:
        ref.close()
    res.figures["ref_burst"] = burst
    res.figures["ref_sustained"] = rate
    say(f"reference sustained: {k(rate)} msg/s (burst {k(burst)} msg/s)")


def sustained_section(b: Bench, res: Results, agent: Agent) -> None:
    section("sustained ingest: single-reading JSON, QoS 0, the default-config agent")
    packet = reading_packets("bench/pump", seed=1)
    warm = run_load(b.port, packet, 1000, 2000.0)
    agent.status.wait(lambda body: agent.counters(body)["samples"] >= warm.sent, 10)

    subject = agent_subject(agent)

    def trial(rate: float) -> Trial:
        return _counted_trial(rate, b.args.step_s,
                              lambda cnt, rt: run_load(b.port, packet, cnt, rt), subject)

    ceiling = res.figures.get("ref_sustained", 0.0) * 1.1 or 50_000.0
    # A short overload first: what the agent drains per second bounds the search, so a
    # failing 10 s step does not leave a minute of backlog behind.
    c0 = settle(subject.counted)[0]
    probe_s = min(2.0, b.args.step_s / 2)
    r = run_load(b.port, packet, round(ceiling * probe_s), ceiling)
    subject.expect = c0 + r.sent
    c1 = agent.counters(agent.status.next())["samples"]
    drained = (c1 - c0) / max(agent.status.at - r.start, 1e-9)
    hi = round(min(ceiling, 1.25 * drained), -2)
    say(f"{probe_s:g} s probe at {k(ceiling)}/s: {k(drained)}/s counted; "
        f"{b.args.step_s:g} s steps, bisection from {k(hi)}/s "
        "(the lower of 1.1 x the reference and 1.25 x the probe)")
    rate, trials = bisect(trial, hi, b.args.steps, ceiling)
    best = max((t for t in trials if t.ok()), key=lambda t: t.rate, default=None)
    res.figures["sustained"] = rate
    res.figures["cpu_us_per_msg"] = best.cpu_s / best.sent * 1e6 if best else None
    res.figures["peak_mib"] = rss_mib(agent.proc.pid)["VmHWM"]
    cpu = f", {res.figures['cpu_us_per_msg']:.0f} us agent CPU per message" if best else ""
    say(f"agent sustained: {k(rate)} msg/s{cpu}; peak RSS {res.figures['peak_mib']:.1f} MiB")


def _frame_burst(b: Bench, fmt: str, frame: int, frames: int) -> str:
    """Blast ``frames`` frames of ``frame`` samples at a fresh agent; one line of figures."""
    cfg = b.config(f"bench-{fmt}", [stream(fmt, f"bench/{fmt}", format=fmt)])
    try:
        agent = b.start_agent(cfg, b.pin)
    except AgentUnsupported as e:
        return f"not supported by this agent build ({e})"
    try:
        rows = normal_rows(frame * 64, seed=2, noise=0.3)
        build = frame_json if fmt == "json" else frame_f32
        t0 = time.time()
        bodies = [build(t0 + i * frame * 1e-3, 1e-3, rows[(i % 64) * frame:(i % 64 + 1) * frame])
                  for i in range(64)]
        topic = f"bench/{fmt}".encode()
        if fmt == "f32":  # each frame its own t0: only the header changes
            def packet(i: int) -> bytes:
                body = bodies[i % 64]
                return publish_packet(topic, F32_HEADER.pack(1, 0, len(FIELDS),
                                                             t0 + i * frame * 1e-3, 1e-3)
                                      + body[F32_HEADER.size:])
        else:
            packets = [publish_packet(topic, p) for p in bodies]

            def packet(i: int) -> bytes:
                return packets[i % 64]
        c0 = agent.counters()
        r = run_load(b.port, packet, frames)
        want = c0["samples"] + frames * frame
        got = agent.status.wait(lambda body: agent.counters(body)["samples"] >= want,
                                max(30.0, frames * frame / 20_000))
        c1 = agent.counters(agent.status.latest)
        bad = agent.status.latest.get("bad_input", {})
        if got is None:
            return (f"{c1['samples'] - c0['samples']}/{frames * frame} samples counted "
                    f"(bad input {bad}); not drained within the wait")
        end_to_end = (c1["samples"] - c0["samples"]) / (got[0] - r.start)
        # The steady rate: between the first and the last status that arrived while the
        # agent was part-way through the burst (both ends are exact arrival times).
        seen = [(at, agent.counters(body)["samples"]) for at, body in list(agent.status.history)
                if at >= r.start]
        mid = [(at, n) for at, n in seen if c0["samples"] < n < want]
        steady = ((mid[-1][1] - mid[0][1]) / (mid[-1][0] - mid[0][0])
                  if len(mid) >= 3 and mid[-1][0] - mid[0][0] >= 1.0 else None)
        rate = steady if steady is not None else end_to_end
        how = (f"steady, between {len(mid)} statuses over {mid[-1][0] - mid[0][0]:.2f} s; "
               f"{k(end_to_end)} from the first send to the status that counted the last "
               f"sample" if steady is not None else
               "from the first send to the status that counted the last sample: too short "
               "for a steady rate")
        return (f"{k(rate)} samples/s ({how}; {frames} frames x {frame} samples sent at "
                f"{k(r.rate() * frame)} samples/s), {c1['windows'] - c0['windows']} windows "
                f"scored, {c1['windows_dropped'] - c0['windows_dropped']} dropped"
                f"{f', bad input {bad}' if bad else ''}|{rate}")
    finally:
        agent.stop()


def frames_section(b: Bench, res: Results) -> None:
    section("framed ingest: a burst of frames, QoS 0, one 8-channel stream (default settings)")
    quick = b.args.quick
    for fmt, frame, frames in (("json", 32, 600 if quick else 12_000),
                               ("f32", b.args.f32_frame,
                                100 if quick else 4_000_000 // b.args.f32_frame)):
        line = _frame_burst(b, fmt, frame, frames)
        text, _, rate = line.partition("|")
        res.figures[f"frames_{fmt}"] = float(rate) if rate else None
        say(f"{fmt:>4} frames of {frame}: {text}")


# The latency stream's alert settings: every episode opens and closes (no cooldown, no
# onset rule).
LATENCY_ALERT = {"cooldown_s": 0, "onset_windows": 0, "clear_windows": 2}


def latency_config(b: Bench, device: str) -> dict[str, Any]:
    return b.config(device, [stream("pump", "bench/lat", alert=LATENCY_ALERT)])


def latency_packets(topic: str, warmup: int, period: int, anomalous: int) -> Packet:
    """Readings stamped with the wall clock at send: normal, then ``anomalous`` of each
    ``period`` far off (after ``warmup`` normal ones), so episodes open and close."""
    rows = [reading_fields(r) for r in normal_rows(512, seed=3, noise=0.3)]
    anomaly = reading_fields(ANOMALY)
    t = topic.encode()

    def packet(i: int) -> bytes:
        anomalous_now = i >= warmup and (i - warmup) % period >= period - anomalous
        values = anomaly if anomalous_now else rows[i % 512]
        return publish_packet(t, reading_json(time.time(), values))

    return packet


class Latencies:
    """A cloud-side subscriber: (arrival wall time - body ts) of each message on a topic."""

    def __init__(self, port: int, topic: str, qos: int = 1) -> None:
        self.ms: list[tuple[float, float]] = []  # (ts, latency ms)
        self.client = paho_client("bench-cloud", port)
        self.client.on_message = self._on_message
        subscribe(self.client, topic, qos)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        ts = json.loads(msg.payload)["ts"]
        self.ms.append((ts, (now - ts) * 1e3))

    def after(self, t: float) -> list[float]:
        return sorted(ms for ts, ms in list(self.ms) if ts >= t)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return math.nan
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def pct_ci(sorted_ms: list[float], q: float, conf: float = 0.95) -> tuple[float, float]:
    """A distribution-free ``conf`` interval for the ``q`` quantile: the order statistics
    whose ranks bracket it (the count of samples below the true quantile is binomial)."""
    n = len(sorted_ms)
    if n == 0:
        return math.nan, math.nan
    tail = (1.0 - conf) / 2
    cdf, below = 0.0, []  # below[k] = P(at most k samples lie below the quantile)
    for i in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                        + (i * math.log(q) if i else 0.0)
                        + ((n - i) * math.log1p(-q) if n - i else 0.0))
        below.append(cdf)
    lo = max([k for k in range(n) if below[k] <= tail], default=0)
    hi = min([k for k in range(n) if below[k] >= 1.0 - tail], default=n - 1)
    return sorted_ms[lo], sorted_ms[hi]


class FsyncProbe:
    """fsyncs of a 400-byte append every 20 ms in the agent's state folder, on a thread:
    what the disk charged a durable commit meanwhile (the relay floor has none)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "fsync-probe"
        self.ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self._stop.wait(0.02):
                os.write(fd, b"x" * 400)
                t = time.perf_counter()
                os.fsync(fd)
                self.ms.append((time.perf_counter() - t) * 1e3)
        finally:
            os.close(fd)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(5)
        self.path.unlink(missing_ok=True)
        return sorted(self.ms)


def ci_text(ci: tuple[float, float]) -> str:
    return f"95 % CI {ci[0]:.2f}-{ci[1]:.2f} ms"


def _relay_child(port: int, ready: Any, stop: Any, cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    c = paho_client("bench-relay", port)
    c.on_message = lambda cl, ud, msg: cl.publish("bench/relay/out", msg.payload, qos=1)
    subscribe(c, "bench/relay/in", 0)
    ready.set()
    stop.wait()
    c.loop_stop()
    c.disconnect()


def latency_section(b: Bench, res: Results) -> None:
    section("sensor -> alert latency at 1,000 msg/s with alerts flowing, vs a relay floor")
    # An episode every 0.12 s (an alert and a resolved message each) for 40 s: about 580
    # messages, so the p99 is the 6th largest and its confidence interval is printed.
    seconds = 2.0 if b.args.quick else 40.0
    rate, warmup, period, anomalous = 1000.0, 600, 120, 20
    n = warmup + round(rate * seconds)
    # The floor: the same payloads through a paho relay with TCP_NODELAY, two broker hops.
    cloud = Latencies(b.port, "bench/relay/out")
    ready, stop = FORK.Event(), FORK.Event()
    relay = FORK.Process(target=_relay_child, args=(b.port, ready, stop, b.pin))
    relay.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("relay did not subscribe")
        r = run_load(b.port, latency_packets("bench/relay/in", warmup, period, anomalous),
                     n, rate)
        time.sleep(0.5)  # the last relayed messages (no counter to wait on: a fixed grace)
        floor = cloud.after(time.time() - (time.monotonic() - r.start) + warmup / rate)
    finally:
        stop.set()
        relay.join(10)
        cloud.close()
    say(f"relay floor: {len(floor)} messages, p50 {pct(floor, 0.5):.2f} ms, "
        f"p99 {pct(floor, 0.99):.2f} ms ({ci_text(pct_ci(floor, 0.99))})")
    agent = b.start_agent(latency_config(b, "bench-lat"), b.pin)
    cloud = Latencies(b.port, "edge/bench-lat/alert/#")
    probe = FsyncProbe(b.work / "bench-lat")
    try:
        t_start = time.time()
        r = run_load(b.port, latency_packets("bench/lat", warmup, period, anomalous), n, rate)
        want = agent.status.next()["streams"]["pump"]
        episodes = int(want["alerts"]) * 2 - (want["state"] == "anomaly")
        deadline = time.monotonic() + 10
        while len(cloud.ms) < episodes and time.monotonic() < deadline:
            time.sleep(0.05)
        lat = cloud.after(t_start + warmup / rate + 0.5)
        st = agent.counters()
    finally:
        fsync_ms = probe.stop()
        agent.stop()
        cloud.close()
    lo, hi = pct_ci(lat, 0.99)
    say(f"agent: {len(lat)} alert/resolved messages after warm-up ({len(cloud.ms)} of "
        f"{episodes} delivered in all), p50 {pct(lat, 0.5):.2f} ms, "
        f"p99 {pct(lat, 0.99):.2f} ms ({ci_text((lo, hi))}), "
        f"max {lat[-1] if lat else math.nan:.2f} ms; "
        f"load {k(r.rate())} msg/s, {st['windows_dropped']} windows dropped")
    # Every alert is fsynced before it is published: the disk's own tail is in its p99.
    say(f"disk meanwhile: fsync of a 400-byte append (the outbox commits one per alert), "
        f"{len(fsync_ms)} probes, p50 {pct(fsync_ms, 0.5):.2f} ms, "
        f"p99 {pct(fsync_ms, 0.99):.2f} ms, max {fsync_ms[-1] if fsync_ms else math.nan:.2f} ms")
    res.figures.update(relay_p50=pct(floor, 0.5), relay_p99=pct(floor, 0.99),
                       lat_p50=pct(lat, 0.5), lat_p99=pct(lat, 0.99), lat_p99_lo=lo,
                       lat_p99_hi=hi, lat_n=len(lat), fsync_p99=pct(fsync_ms, 0.99))


def alerts_section(b: Bench, res: Results) -> None:
    section("1,000 alert messages/s (alert + resolved) delivered upstream")
    seconds = 2.0 if b.args.quick else 10.0
    # Non-overlapping windows, each frame one normal window then one far-off one: every
    # frame opens an episode and the next one closes it (about 2 messages a frame).
    cfg = b.config("bench-alerts", [stream("pump", "bench/alerts", window=16, hop=16, alert={
        "cooldown_s": 0, "onset_windows": 0, "consecutive": 1, "clear_windows": 1,
        "smoothing": 1.0}, adapt={"input_halflife": 0, "threshold_halflife": 0},
        summary_s=0)])
    agent = b.start_agent(cfg, b.pin)
    cloud = Latencies(b.port, "edge/bench-alerts/alert/#")
    topic = b"bench/alerts"
    rows = normal_rows(32 * 64, seed=4, noise=0.1)
    t0 = time.time()
    try:
        warm = [publish_packet(topic, frame_json(t0 + i * 0.032, 1e-3, rows[i * 32:i * 32 + 32]))
                for i in range(16)]
        run_load(b.port, lambda i: warm[i], len(warm), 200.0)
        agent.status.wait(lambda body: body["streams"]["pump"]["state"] != "warming_up", 10)
        alternating = rows[:32].copy()
        alternating[16:] = ANOMALY

        def packet(i: int) -> bytes:
            return publish_packet(topic, frame_json(t0 + (16 + i) * 0.032, 1e-3, alternating))

        frames = round(500 * seconds)
        s0 = agent.status.next()
        got0 = len(cloud.ms)
        backlog = [(time.monotonic(), s0["backlog"])]
        wait = start_load(b.port, packet, frames, 500.0)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s = agent.status.next()
            backlog.append((time.monotonic(), s["backlog"]))
        r = wait()
        s1 = agent.status.next()
        delivered_live = len(cloud.ms) - got0
        produced = _alert_messages(s1) - _alert_messages(s0)
        deadline = time.monotonic() + (2 if b.args.quick else 30)
        last, still = len(cloud.ms), time.monotonic()
        while time.monotonic() < deadline and len(cloud.ms) - got0 < _alert_messages(
                agent.status.latest) - _alert_messages(s0):
            time.sleep(0.1)
            if len(cloud.ms) != last:
                last, still = len(cloud.ms), time.monotonic()
            elif time.monotonic() - still > 5:
                break
        drained = len(cloud.ms) - got0
        took = time.monotonic() - r.end
    finally:
        st = agent.counters()
        agent.stop()
        cloud.close()
    growth = _slope(backlog)
    span = r.end - r.start
    res.figures.update(alerts_rate=produced / span, alerts_delivered=delivered_live / span,
                       backlog_growth=growth)
    say(f"produced {produced} alert messages in {span:.1f} s ({k(produced / span)}/s); "
        f"delivered during the load {delivered_live} ({k(delivered_live / span)}/s); "
        f"{drained} delivered in all {took:.1f} s after the load ended")
    say(f"outbox backlog {backlog[0][1]} -> {backlog[-1][1]} during the load "
        f"({growth:+.0f} rows/s); windows dropped {st['windows_dropped']}")


def _alert_messages(status: dict[str, Any]) -> int:
    """Messages on the alert topic so far: an alert per episode, a resolved per closed one."""
    s = status["streams"]["pump"]
    return int(s["alerts"]) * 2 - (s["state"] == "anomaly")


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return 0.0
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def many_section(b: Bench, res: Results) -> None:
    n_streams, hz = 50, 200.0
    section(f"many streams: {n_streams} streams x {hz:.0f} Hz single readings, agent on CPU 0")
    cfg = b.config("bench-many", [stream(f"s{i}", f"bench/many/{i}")
                                  for i in range(n_streams)])
    agent = b.start_agent(cfg, [0])
    rows = [reading_fields(r) for r in normal_rows(512, seed=5, noise=0.3)]
    topics = [f"bench/many/{i}".encode() for i in range(n_streams)]

    def packet(i: int) -> bytes:
        return publish_packet(topics[i % n_streams],
                              reading_json(time.time(), rows[(i // n_streams) % 512]))

    try:
        say(f"started in {agent.ready_s:.2f} s; RSS {rss_mib(agent.proc.pid)['VmRSS']:.1f} MiB")
        run_load(b.port, packet, n_streams * 450, 15_000.0)  # every stream past its warm-up
        agent.status.wait(lambda body: agent.counters(body)["samples"] >= n_streams * 450, 30)

        subject = agent_subject(agent)

        def trial(per_stream: float) -> Trial:
            t = _counted_trial(per_stream * n_streams, b.args.step_s,
                               lambda cnt, rt: run_load(b.port, packet, cnt, rt), subject)
            say(f"{per_stream:.0f} Hz per stream:")
            return t

        rate, _ = bisect(trial, hz, 1 if b.args.quick else 3)
    finally:
        agent.stop()
    res.figures["many_hz"] = rate
    verdict = "keeps up" if rate >= hz else f"stops keeping up: passes at {rate:.0f} Hz"
    say(f"{n_streams} streams at {hz:.0f} Hz: {verdict} ({k(rate * n_streams)} msg/s in all)")


def stage_section(b: Bench, res: Results) -> None:
    """Per-stage µs, in this process, on the agent's own classes (no MQTT)."""
    section("per-stage cost (in-process, the agent's classes, the same payloads)")
    from agent.config import load_config  # noqa: PLC0415  (numpy-heavy: only for this section)
    from agent.decode import decode  # noqa: PLC0415
    from agent.pipeline import StreamPipeline  # noqa: PLC0415
    from agent.scoring.registry import open_stream_model  # noqa: PLC0415
    from agent.uplink.messages import message_for  # noqa: PLC0415
    from agent.uplink.outbox import Outbox  # noqa: PLC0415

    def pipeline(**over: Any) -> Any:
        cfg = b.config("bench-stage", [stream("pump", "bench/stage", **over)])
        path = b.work / "stage.yaml"
        path.write_text(yaml.safe_dump(cfg))
        c = load_config(path)
        card, scorer = open_stream_model(c, c.streams[0])
        return StreamPipeline(c.streams[0], card, scorer)

    def per_call(fn: Callable[[], Any], n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e6

    quick = b.args.quick
    rows = normal_rows(4096, seed=6, noise=0.3)
    now = time.time()
    one = reading_json(now, rows[0])
    fj = frame_json(now, 1e-3, rows[:32])
    f32 = frame_f32(now, 1e-3, rows[:b.args.f32_frame])
    table: list[tuple[str, str]] = []
    table.append((f"decode: JSON reading ({len(one)} B)",
                  f"{per_call(lambda: decode(one, 'json', FIELDS, now), 20_000):.2f} µs"))
    us = per_call(lambda: decode(fj, "json", FIELDS, now), 2_000)
    table.append(("decode: JSON frame of 32", f"{us:.1f} µs ({us / 32:.2f} µs/sample)"))
    try:
        us = per_call(lambda: decode(f32, "f32", FIELDS, now), 5_000)
        n = b.args.f32_frame
        table.append((f"decode: f32 frame of {n}", f"{us:.1f} µs ({us / n * 1e3:.1f} ns/sample)"))
    except Exception as e:  # an agent build without the f32 format
        table.append((f"decode: f32 frame of {b.args.f32_frame}",
                      f"not supported by this agent build ({type(e).__name__}: {e})"))
    p = pipeline(buffer=65536)
    p.push(now, list(rows[0]))
    for i in range(1, 600):  # past the warm-up
        p.push(now + i * 1e-3, list(rows[i]))
    vals = [list(map(float, r)) for r in rows]
    i_ts = iter(range(10**9))
    n_app = 4096 if quick else 16_384
    us = per_call(lambda: p.append(now + 1 + next(i_ts) * 1e-3, vals[next(i_ts) % 4096]), n_app)
    table.append(("ring: append one reading", f"{us:.2f} µs"))
    for batch in (1, 32):
        q = pipeline(buffer=65536, batch=batch)
        for i in range(600):
            q.push(now + i * 1e-3, vals[i])
        for i in range(4096 if quick else 16_384):
            q.append(now + 1 + i * 1e-3, vals[i % 4096])
        before = q.windows_scored
        t = time.perf_counter()
        q.process()
        done = q.windows_scored - before
        us = (time.perf_counter() - t) / max(done, 1) * 1e6
        table.append((f"score: batch {batch} ({done} windows)",
                      f"{us:.1f} µs/window, {us * batch:.0f} µs per call"))
    ob = Outbox(b.work / "stage-outbox" / "outbox.db", synchronous="full")
    from agent.pipeline import Episode  # noqa: PLC0415

    ep = Episode("alert", "pump", 1, now, now, 3.0, 1.0, 0.9, "skab-ae", 1, 16)
    msg = message_for(ep, "bench", "edge")
    assert msg is not None
    kind, topic, build = msg
    n_commit = 100 if quick else 500
    us = per_call(lambda: ob.submit([(kind, "pump", topic, build)]), n_commit)
    table.append(("commit: one alert, synchronous=full (fsync)", f"{us:.0f} µs"))
    us = per_call(lambda: ob.submit([(kind, "pump", topic, build)] * 32), n_commit // 10)
    table.append(("commit: 32 alerts in one transaction", f"{us:.0f} µs ({us / 32:.1f} µs each)"))
    ob.close()
    width = max(len(a) for a, _ in table)
    for a, v in table:
        say(f"{a:<{width}}  {v}")
    if res.figures.get("cpu_us_per_msg"):
        say(f"agent CPU per message at its sustained rate (all threads, MQTT included): "
            f"{res.figures['cpu_us_per_msg']:.0f} µs")


def summary_section(b: Bench, res: Results) -> None:
    section("summary: issue 13 targets, as ratios of figures from this run")
    f = res.figures

    def row(what: str, value: str, ref: str, ratio: str, target: str) -> None:
        say(f"{what:<30} {value:>10} {ref:>20} {ratio:>9}  {target}")

    row("what", "agent", "reference", "ratio", "target")
    ref = f.get("ref_sustained") or math.nan
    row("sustained JSON msg/s", k(f.get("sustained", 0)), f"bare paho {k(ref)}",
        f"{f.get('sustained', 0) / ref:.2f}", ">= 0.80")
    fj, ff = f.get("frames_json"), f.get("frames_f32")
    row("framed JSON samples/s", k(fj) if fj else "n/a", "-", "-", "-")
    row("f32 frames samples/s", k(ff) if ff else "n/a", "1M on one core",
        f"{ff / 1e6:.2f}" if ff else "n/a", ">= 1.00")
    row("latency p50 ms", f"{f['lat_p50']:.2f}", f"relay {f['relay_p50']:.2f}",
        f"{f['lat_p50'] / f['relay_p50']:.1f}x", "-")
    gap = f["lat_p99"] - f["relay_p99"]
    row("latency p99 ms", f"{f['lat_p99']:.2f}", f"relay {f['relay_p99']:.2f}",
        f"+{gap:.2f} ms", "<= +2 ms")
    row(f"  its 95 % CI ({f['lat_n']} alerts)", f"{f['lat_p99_lo']:.2f}-{f['lat_p99_hi']:.2f}",
        "-", f"+{f['lat_p99_lo'] - f['relay_p99']:.2f}..{f['lat_p99_hi'] - f['relay_p99']:+.2f}",
        "-")
    row("  disk fsync p99 meanwhile ms", f"{f['fsync_p99']:.2f}", "-", "-", "-")
    row("alert messages delivered/s", k(f["alerts_delivered"]), f"produced {k(f['alerts_rate'])}",
        f"{f['alerts_delivered'] / max(f['alerts_rate'], 1e-9):.2f}", "1.00, backlog flat")
    row("backlog growth rows/s", f"{f['backlog_growth']:+.0f}", "-", "-", "0")
    row("idle RSS MiB", f"{f['idle_mib']:.1f}", "60", f"{f['idle_mib'] / 60:.2f}", "<= 1.00")
    row("peak RSS MiB", f"{f.get('peak_mib', math.nan):.1f}", "-", "-", "-")
    row("start to ready s", f"{f['ready_s']:.2f}", "1.0", f"{f['ready_s']:.2f}", "<= 1.00")
    many = f.get("many_hz", 0)
    row("50 streams, Hz each (CPU 0)", f"{many:.0f}", "200", f"{many / 200:.2f}", ">= 1.00")


NODE_RED_FUNCTION = """const p = msg.payload;
if (typeof p !== "object" || p === null || typeof p.ts !== "number") { return null; }
for (const f of %s) {
    if (typeof p[f] !== "number" || !isFinite(p[f])) { return null; }
}
return msg;"""


def node_red_flow(port: int) -> list[dict[str, Any]]:
    """mqtt in (parsed JSON) -> function (checks the fields) -> mqtt out (QoS 1)."""
    return [
        {"id": "bench-tab", "type": "tab", "label": "bench"},
        {"id": "bench-broker", "type": "mqtt-broker", "name": "bench", "broker": "127.0.0.1",
         "port": str(port), "clientid": "", "autoConnect": True, "usetls": False,
         "protocolVersion": "4", "keepalive": "60", "cleansession": True},
        {"id": "bench-in", "type": "mqtt in", "z": "bench-tab", "topic": "bench/nr/in",
         "qos": "0", "datatype": "json", "broker": "bench-broker", "nl": False, "rap": True,
         "rh": 0, "inputs": 0, "wires": [["bench-fn"]]},
        {"id": "bench-fn", "type": "function", "z": "bench-tab", "name": "check",
         "func": NODE_RED_FUNCTION % json.dumps(FIELDS), "outputs": 1, "wires": [["bench-out"]]},
        {"id": "bench-out", "type": "mqtt out", "z": "bench-tab", "topic": "bench/nr/out",
         "qos": "1", "retain": "false", "broker": "bench-broker", "wires": []},
    ]


def start_node_red(b: Bench, exe: str) -> tuple[subprocess.Popen[bytes], float, Reference]:
    """Start Node-RED with the bench flow; ready = the first probe through the flow."""
    from agent.broker import free_port  # noqa: PLC0415

    user_dir = b.work / "node-red"
    user_dir.mkdir()
    (user_dir / "flows.json").write_text(json.dumps(node_red_flow(b.port)))
    counter = Reference(b, "bench/nr/out")
    probe = reading_packets("bench/nr/in")
    log = (b.work / "node-red.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([*b.pin_argv(b.pin), exe, "--userDir", str(user_dir), "--port",
                             str(free_port()), "flows.json"], stdout=log,
                            stderr=subprocess.STDOUT)
    s = raw_connect(b.port, "bench-nr-probe")
    try:
        i = 0
        while counter.count.value == 0:
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError("node-red did not pass a message: "
                                   f"{(b.work / 'node-red.log').read_text()[-800:]}")
            s.sendall(probe(i))
            i += 1
            time.sleep(0.02)
        ready = counter.first.value - t0
    finally:
        s.close()
    return proc, ready, counter


def peer_section(b: Bench, res: Results, exe: str) -> None:
    """Node-RED on the same broker, load and criteria as the agent (scripts/bench_peer.sh)."""
    section("peer: Node-RED (mqtt in -> function -> mqtt out), same broker and load")
    proc, ready, counter = start_node_red(b, exe)
    try:
        time.sleep(2.0)
        idle = rss_mib(proc.pid)["VmRSS"]
        say(f"start to the first message through the flow {ready:.2f} s, idle RSS {idle:.1f} MiB")
        packet = reading_packets("bench/nr/in", seed=7)

        subject = reference_subject(counter, proc.pid)

        def trial(rate: float) -> Trial:
            return _counted_trial(rate, b.args.step_s,
                                  lambda cnt, rt: run_load(b.port, packet, cnt, rt), subject)

        ceiling = res.figures.get("ref_sustained", 0.0) * 1.1 or 40_000.0
        say(f"sustained: {b.args.step_s:g} s steps, bisection below {k(ceiling)}/s")
        rate, _ = bisect(trial, round(ceiling, -2), b.args.steps)
        peak = rss_mib(proc.pid)["VmHWM"]
        say(f"Node-RED sustained: {k(rate)} msg/s; peak RSS {peak:.1f} MiB")
        cloud = Latencies(b.port, "bench/nr/out")
        try:
            seconds = 2.0 if b.args.quick else 20.0
            r = run_load(b.port, latency_packets("bench/nr/in", 10**9, 1, 0), round(1000 * seconds),
                         1000.0)
            time.sleep(0.5)
            lat = cloud.after(time.time() - (time.monotonic() - r.start) + 0.5)
        finally:
            cloud.close()
        say(f"latency at 1,000 msg/s: {len(lat)} messages, p50 {pct(lat, 0.5):.2f} ms, "
            f"p99 {pct(lat, 0.99):.2f} ms")
    finally:
        counter.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ref = res.figures.get("ref_sustained")
    ratio = f" = {rate / ref:.2f} x the bare paho reference ({k(ref)})" if ref else ""
    say(f"summary: Node-RED {k(rate)} msg/s{ratio}; latency p50/p99 {pct(lat, 0.5):.2f}/"
        f"{pct(lat, 0.99):.2f} ms; idle/peak RSS {idle:.0f}/{peak:.0f} MiB; start {ready:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="every section with short steps (1 s) and small bursts")
    ap.add_argument("--cpus", type=int, choices=[1], default=None,
                    help="pin the agent, the paho reference and the relay to CPU 0 (taskset)")
    ap.add_argument("--step-s", type=float, default=None,
                    help="seconds per sustained-rate step (default 10, --quick 1)")
    ap.add_argument("--steps", type=int, default=None,
                    help="bisection steps after the first (default 5, --quick 2)")
    ap.add_argument("--f32-frame", type=int, default=256, help="samples per f32 frame")
    ap.add_argument("--peer-node-red", metavar="NODE_RED", default=None,
                    help="only the reference and Node-RED (path of its node-red command; "
                         "scripts/bench_peer.sh installs it)")
    ap.add_argument("--only", default=None,
                    help="comma-separated sections to run (startup,reference,sustained,frames,"
                         "latency,alerts,many,stages); the summary needs them all")
    args = ap.parse_args()
    args.step_s = args.step_s or (1.0 if args.quick else 10.0)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    only = set(args.only.split(",")) if args.only else None

    def want(name: str) -> bool:
        return only is None or name in only

    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    # The broker queues without limit: a step beyond the agent's rate then shows as a
    # slow drain, not as messages mosquitto chose to drop.
    extra = "set_tcp_nodelay true\nmax_queued_messages 0\nmax_queued_bytes 0\n"
    res = Results()
    section("setup")
    say(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, mosquitto on loopback, "
        f"{'--quick, ' if args.quick else ''}steps of {args.step_s:g} s")
    say("pinned: agent, bare paho reference and relay to CPU 0 (taskset -c 0); broker and "
        "load generators unpinned" if args.cpus else "pinned: nothing by the bench (--cpus 1 "
        "pins to CPU 0); the agent pins itself to one CPU (service.cpu: auto, the default)")
    try:
        with LocalBroker(workdir=work / "broker", extra=extra) as broker:
            run_sections(Bench(args, work, broker), res, want)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    print(f"\nbench: done in {time.monotonic() - t_all:.0f} s", flush=True)


def run_sections(b: Bench, res: Results, want: Callable[[str], bool]) -> None:
    """The sections asked for, in order; the summary only when all of them ran."""
    if b.args.peer_node_red:
        reference_section(b, res)
        peer_section(b, res, b.args.peer_node_red)
        return
    agent = start_up(b, res) if want("startup") or want("sustained") else None
    try:
        if want("reference"):
            reference_section(b, res)
        if want("sustained") and agent is not None:
            sustained_section(b, res, agent)
    finally:
        if agent is not None:
            agent.stop()
    for name, run in (("frames", frames_section), ("latency", latency_section),
                      ("alerts", alerts_section), ("many", many_section),
                      ("stages", stage_section)):
        if want(name):
            run(b, res)
    if b.args.only is None:
        summary_section(b, res)

if __name__ == "__main__":
    main()
