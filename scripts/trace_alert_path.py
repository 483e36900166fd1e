"""Where an alert's latency goes: runs `bench.py --only latency` with the agent traced
(scripts/alert_trace/sitecustomize.py) and prints percentiles of each hop.

    .venv/bin/python scripts/trace_alert_path.py [--switch-interval S]

Hops, per alert or resolved message, from its window's last sample time (the
sensor's send time in the benchmark): to the sink (transport, decode, the
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
HOPS = [("window end -> sink", None, "sink"), ("sink -> commit start", "sink", "commit start"),
        ("commit start -> committed", "commit start", "committed"),
        ("committed -> publish", "committed", "publish"),
        ("window end -> publish", None, "publish")]


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="run the agent with sys.setswitchinterval(S) (CPython default 0.005)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="alert-trace-") as tmp:
        out = str(Path(tmp) / "trace")
        env = {**os.environ, "ALERT_TRACE": out,
               "PYTHONPATH": os.pathsep.join([str(HERE / "alert_trace"),
                                              os.environ.get("PYTHONPATH", "")])}
        if args.switch_interval is not None:
            env["ALERT_TRACE_SWITCH_INTERVAL"] = str(args.switch_interval)
        subprocess.run([sys.executable, str(HERE / "bench.py"), "--only", "latency"], env=env,
                       check=True)
        times: dict[float, dict[str, float]] = {}
        for path in glob.glob(out + ".*"):
            for what, ts, t in json.loads(Path(path).read_text()):
                times.setdefault(ts, {}).setdefault(what, t)
    done = [(ts, d) for ts, d in sorted(times.items()) if len(d) == 4][10:]  # past warm-up
    print(f"\n== where {len(done)} alert messages' time went (ms)")
    for name, a, b in HOPS:
        xs = [(d[b] - (ts if a is None else d[a])) * 1e3 for ts, d in done]
        if xs:
            print(f"   {name:26s} p50 {pct(xs, 0.5):6.2f}  p90 {pct(xs, 0.9):6.2f}  "
                  f"p99 {pct(xs, 0.99):6.2f}  max {max(xs):6.2f}")


if __name__ == "__main__":
    main()
