"""What running as a service costs: RSS and idle CPU with and without the health endpoint.

Runs a real `edge-agent run` (the default stream config, the shipped model)
against a throw-away mosquitto with NOTIFY_SOCKET and WATCHDOG_USEC set, waits
for READY=1, then measures resident memory, CPU over an idle period, and the
time one /metrics scrape takes.

    .venv/bin/python scripts/service_footprint.py [--idle 30] [--scrapes 50]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from agent.broker import LocalBroker, free_port

REPO = Path(__file__).resolve().parent.parent
FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(work: Path, port: int, health_port: int, idle: float,
             scrapes: int) -> dict[str, float]:
    cfg = {
        "device_id": "bench",
        "state_dir": str(work / f"state-{health_port}"),
        "local": {"host": "127.0.0.1", "port": port},
        "upstream": {"host": "127.0.0.1", "port": port},
        "service": {"health": {"port": health_port}},
        "streams": [{"name": "pump", "topic": "sensors/pump/+", "fields": FIELDS}],
    }
    path = work / f"agent-{health_port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    notify_path = str(work / f"notify-{health_port}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "30000000"}
    exe = Path(sys.executable).parent / "edge-agent"
    proc = subprocess.Popen([str(exe), "run", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while b"READY=1" not in sock.recv(4096):
            pass
        ready_s = time.monotonic() - t0
        time.sleep(2)  # let start-up allocations settle
        out = {"ready_s": ready_s, "rss_mib": rss_mib(proc.pid)}
        c0, w0 = cpu_s(proc.pid), time.monotonic()
        time.sleep(idle)
        out["idle_cpu_pct"] = 100 * (cpu_s(proc.pid) - c0) / (time.monotonic() - w0)
        if health_port:
            t = time.perf_counter()
            for _ in range(scrapes):
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics") as r:
                    r.read()
            out["scrape_ms"] = 1000 * (time.perf_counter() - t) / scrapes
            out["rss_after_scrapes_mib"] = rss_mib(proc.pid)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    ap.add_argument("--scrapes", type=int, default=50, help="/metrics requests to time")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, LocalBroker() as broker:
        work = Path(d)
        for label, hp in (("health endpoint off", 0), ("health endpoint on", free_port())):
            r = run_once(work, broker.port, hp, args.idle, args.scrapes)
            print(f"{label:20s} " + "  ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
