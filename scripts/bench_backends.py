#!/usr/bin/env python3
"""Each installed inference backend on the shipped model: time per call, samples/s, RSS.

One run, one machine: every backend runs in its own subprocess (so its RSS is its own:
the interpreter + numpy + that runtime + the model), at batch 1, 32 and 256. Backends that
are not installed or cannot run here are listed with the reason.

    .venv/bin/python scripts/bench_backends.py [--model models/skab-ae] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCHES = (1, 32, 256)

CHILD = r"""
import json, sys, time, resource
from pathlib import Path
import numpy as np
key, path, fmt, secs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
out = {"backend": key, "file": path.name, "rss_before_mib": rss_mib(), "batches": {}}
if key == "litert":
    from agent.scoring.litert import LiteRTBackend as B; kw = {}
elif key == "onnxruntime":
    from agent.scoring.onnx import OnnxRuntimeBackend as B; kw = {}
else:
    from agent.scoring.tensorrt import TensorRTBackend as B; kw = {"precision": "fp16", "fmt": fmt}
for batch in (1, 32, 256):
    b = B(path, batch, **kw)
    if key == "onnxruntime":
        out["providers"] = b.providers
    x = np.random.default_rng(0).normal(size=(batch, *b.input_shape)).astype(np.float32)
    for _ in range(20):
        b.predict(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < secs:
        b.predict(x); n += 1
    dt = (time.perf_counter() - t0) / n
    out["batches"][batch] = {"us_per_call": dt * 1e6, "samples_per_s": batch / dt, "calls": n}
out["rss_mib"] = rss_mib()
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "skab-ae")
    p.add_argument("--seconds", type=float, default=2.0, help="timing per batch size")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from agent.config import BackendOptions  # noqa: PLC0415
    from agent.scoring.card import load_card  # noqa: PLC0415
    from agent.scoring.registry import BACKENDS  # noqa: PLC0415

    card = load_card(args.model / "model.json")
    rows, skipped = [], []
    for key, spec in BACKENDS.items():
        why = spec.missing(BackendOptions())
        f = next((f for f in card.files if f.format in spec.formats), None)
        if why or f is None:
            skipped.append((key, why or f"no {'/'.join(spec.formats)} file in the card"))
            continue
        r = subprocess.run([sys.executable, "-c", CHILD, key, str(f.path), f.format,
                            str(args.seconds)], capture_output=True, text=True, cwd=REPO,
                           check=False)
        if r.returncode != 0:
            skipped.append((key, r.stderr.strip().splitlines()[-1]))
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"# {platform.machine()}, {platform.processor() or platform.platform()}, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(f"# model {card.name} v{card.version}; command: {' '.join(sys.argv)}")
    print("| backend | file | batch 1 us/call | batch 1 samples/s | batch 32 us/call | "
          "batch 32 samples/s | batch 256 us/call | batch 256 samples/s | RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for b in BATCHES:
            d = r["batches"][str(b)] if str(b) in r["batches"] else r["batches"][b]
            cells += [f"{d['us_per_call']:.1f}", f"{d['samples_per_s']:,.0f}"]
        name = r["backend"] + (f" ({', '.join(r['providers'])})" if "providers" in r else "")
        print(f"| {name} | {r['file']} | {' | '.join(cells)} | {r['rss_mib']:.0f} |")
    for key, why in skipped:
        print(f"| {key} | not run: {why} | | | | | | | |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
