"""Where an alert's latency goes: runs `bench.py --only latency` with the agent traced
(scripts/alert_trace/sitecustomize.py) and prints percentiles of each hop.

    .venv/bin/python scripts/trace_alert_path.py [--switch-interval S] [--cpus 1]

Hops, per alert or resolved message, from its window's last sample time (the
sensor's send time in the benchmark): to its arrival in the agent's ingest
callback (the sender, the broker, paho's read), on to the sink (decode, the
batching wait, scoring), to the committer taking it, the commit (one
transaction and its fsync, to the outbox's return), the hand-over to paho's
publish (the uplink's query, getting the GIL back). The last
hop to the cloud subscriber is in the benchmark's own figure.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The publish may come before the commit's end: the committer hands live rows to
# paho itself, inside its commit step; so the commit is timed to the publish.
HOPS = [("window end -> arrived", None, "arrived"), ("arrived -> sink", "arrived", "sink"),
        ("window end -> sink", None, "sink"), ("sink -> commit start", "sink", "commit start"),
        ("commit start -> committed", "commit start", "committed"),
        ("committed -> publish", "committed", "publish"),
        ("window end -> publish", None, "publish")]


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="run the agent with sys.setswitchinterval(S) (CPython default 0.005)")
    ap.add_argument("--cpus", type=int, choices=[1], default=None,
                    help="pass --cpus 1 to the benchmark (the agent and the relay on CPU 0)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="alert-trace-") as tmp:
        out = str(Path(tmp) / "trace")
        env = {**os.environ, "ALERT_TRACE": out,
               "PYTHONPATH": os.pathsep.join([str(HERE / "alert_trace"),
                                              os.environ.get("PYTHONPATH", "")])}
        if args.switch_interval is not None:
            env["ALERT_TRACE_SWITCH_INTERVAL"] = str(args.switch_interval)
        subprocess.run([sys.executable, str(HERE / "bench.py"), "--only", "latency",
                        *(["--cpus", "1"] if args.cpus else [])], env=env,
                       check=True)
        times: dict[float, dict[str, float]] = {}
        for path in glob.glob(out + ".*"):
            for what, ts, t in json.loads(Path(path).read_text()):
                times.setdefault(ts, {}).setdefault(what, t)
    done = [(ts, d) for ts, d in sorted(times.items()) if len(d) == 5][10:]  # past warm-up
    print(f"\n== where {len(done)} alert messages' time went (ms)")
    for name, a, b in HOPS:
        xs = [(d[b] - (ts if a is None else d[a])) * 1e3 for ts, d in done]
        if xs:
            print(f"   {name:26s} p50 {pct(xs, 0.5):6.2f}  p90 {pct(xs, 0.9):6.2f}  "
                  f"p99 {pct(xs, 0.99):6.2f}  max {max(xs):6.2f}")


if __name__ == "__main__":
    main()
