"""Sustained ingest rate and memory of a real `edge-agent run` under a fixed load.

    .venv/bin/python scripts/bench.py [--messages 50000] [--frame 1] [--qos 0]

Starts a throw-away mosquitto, runs the agent as a subprocess with the shipped
model (one 8-channel stream, window 16, hop 4), and blasts `--messages` JSON
payloads from a separate publisher process. Prints what the agent ingested per
second (from its retained status), how much was lost, the windows it scored, and
its peak RSS (VmHWM) and CPU time. Shared machines are noisy: compare runs made
back to back.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import LocalBroker

FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS"]
ROW = [0.21, 0.27, 2.4, 0.11, 89.5, 28.4, 228.6, 125.1]


def publish(port: int, n: int, frame: int, qos: int) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub")
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = 1_700_000_000.0
    # Serialised up front so the publisher, not the agent, is cheap.
    payloads = []
    for i in range(256):
        if frame == 1:
            body = {"ts": t0 + i, **dict(zip(FIELDS, ROW, strict=True))}
        else:
            body = {"ts": [t0 + i * frame + k for k in range(frame)],
                    **{f: [v + k * 1e-3 for k in range(frame)]
                       for f, v in zip(FIELDS, ROW, strict=True)}}
        payloads.append(json.dumps(body).encode())
    info = None
    for i in range(n):
        info = c.publish("bench/pump", payloads[i % 256], qos=qos)
    if info is not None and qos:
        info.wait_for_publish(60)
    # QoS 0 has no acknowledgement: wait until paho's own queue is written out.
    deadline = time.monotonic() + 60
    while c.want_write() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    c.loop_stop()
    c.disconnect()


def proc_stat(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--frame", type=int, default=1, help="samples per message")
    ap.add_argument("--qos", type=int, default=0, choices=[0, 1])
    ap.add_argument("--drift", choices=["adwin", "page_hinkley", "none"], default=None,
                    help="the stream's adapt.drift (default: the config default)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    # The broker may queue without limit: a burst then measures how fast the
    # agent drains it rather than where mosquitto starts dropping.
    extra = "set_tcp_nodelay true\nmax_queued_messages 0\nmax_queued_bytes 0\n"
    with LocalBroker(workdir=tmp / "broker", extra=extra) as broker:
        cfg = {
            "device_id": "bench", "state_dir": str(tmp / "state"), "log_level": "warning",
            "local": {"host": "127.0.0.1", "port": broker.port, "qos": args.qos},
            "upstream": {"host": "127.0.0.1", "port": broker.port, "status_interval_s": 0.5},
            "streams": [{"name": "pump", "topic": "bench/pump", "fields": FIELDS, "window": 16,
                         "hop": 4, "warmup": 400, "batch": 64, "buffer": 65536,
                         "alert": {"threshold": "auto"}}],
        }
        if args.drift is not None:
            cfg["streams"][0]["adapt"] = {"drift": args.drift}
        (tmp / "agent.yaml").write_text(yaml.safe_dump(cfg))
        exe = Path(sys.executable).parent / "edge-agent"
        agent = subprocess.Popen([str(exe), "run", "--config", str(tmp / "agent.yaml")],
                                 stderr=subprocess.DEVNULL)
        status: dict[str, dict] = {}
        got = threading.Event()

        def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
            body = json.loads(msg.payload)
            if body.get("status") == "online":
                status["last"] = body
                got.set()

        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-status")
        sub.on_message = on_message
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe("edge/bench/status")
        sub.loop_start()
        if not got.wait(30):
            sys.exit("agent did not come up")
        time.sleep(1.0)
        idle = proc_stat(agent.pid)
        expected = args.messages * args.frame
        pub = mp.Process(target=publish, args=(broker.port, args.messages, args.frame, args.qos))
        t_start = time.monotonic()
        cpu0 = idle["cpu_s"]
        pub.start()
        first_t = None
        samples = 0
        last_change = time.monotonic()
        while True:
            time.sleep(0.25)
            s = status["last"]["streams"]["pump"]["samples"]
            if s and first_t is None:
                first_t = time.monotonic()
            if s != samples:
                samples, last_change = s, time.monotonic()
            if samples >= expected or time.monotonic() - last_change > 3:
                break
        elapsed = last_change - t_start
        pub.join()
        busy = proc_stat(agent.pid)
        st = status["last"]["streams"]["pump"]
        agent.terminate()
        rc = agent.wait(30)
        sub.loop_stop()

    print(f"load: {args.messages} messages x {args.frame} samples, QoS {args.qos}, "
          f"8 channels, window 16 hop 4")
    print(f"ingested: {samples}/{expected} samples ({expected - samples} lost) "
          f"in {elapsed:.2f} s -> {samples / elapsed:,.0f} samples/s, "
          f"{samples / args.frame / elapsed:,.0f} msg/s")
    print(f"bad input: {status['last']['bad_input']}")
    print(f"windows scored: {st['windows']}, dropped by the ring: {st['windows_dropped']}")
    print(f"agent CPU: {busy['cpu_s'] - cpu0:.2f} s over the run "
          f"({(busy['cpu_s'] - cpu0) / elapsed * 100:.0f} % of one core)")
    print(f"agent RSS: idle {idle['VmRSS']:.1f} MiB, after load {busy['VmRSS']:.1f} MiB, "
          f"peak {busy['VmHWM']:.1f} MiB")
    print(f"agent exit code after SIGTERM: {rc}")


if __name__ == "__main__":
    main()
