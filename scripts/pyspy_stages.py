"""Fold a py-spy recording of `scripts/bench.py` into the agent's stages: where the GIL went.

    .venv/bin/pip install py-spy
    .venv/bin/py-spy record --gil --subprocesses -r 250 -f raw -o /tmp/agent.txt -- \\
        .venv/bin/python scripts/bench.py --only sustained
    .venv/bin/python scripts/pyspy_stages.py /tmp/agent.txt

Only the `edge-agent run` process's samples count. Each sample goes to the first
stage whose frame is on its stack, in the order of STAGES (so ring reads inside
scoring count as scoring); the start-up (imports, config) is left out by keeping
only samples of paho's network threads and the inference thread.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

# (stage, a frame that marks it), first match wins
STAGES = [
    ("decode (agent/decode.py)", "(agent/decode.py:"),
    ("score (StreamPipeline.process)", "StreamPipeline.process "),
    ("outbox sink (Agent._sink)", "Agent._sink "),
    ("ring write (StreamPipeline.append)", "StreamPipeline.append "),
    ("ingest dispatch and checks (agent/ingest.py)", "(agent/ingest.py:"),
    ("paho: callback dispatch (_handle_on_message)", "Client._handle_on_message "),
    ("paho: socket read and packet parsing", "Client._packet_read "),
    ("paho: publish, keepalive, select (both clients)", "Client._thread_main "),
    ("inference thread: wait, summaries, hooks", "Agent._work "),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw", type=Path, help="py-spy record -f raw output")
    args = ap.parse_args()
    counts: Counter[str] = Counter()
    for line in args.raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "edge-agent run" not in stack:
            continue
        stage = next((name for name, mark in STAGES if mark in stack), None)
        if stage is not None:
            counts[stage] += int(n)
    total = sum(counts.values())
    print(f"{total} GIL samples of the agent's threads")
    for name, _ in STAGES:
        print(f"  {name:50s} {counts[name]:6d}  {counts[name] / max(total, 1) * 100:5.1f} %")


if __name__ == "__main__":
    main()
