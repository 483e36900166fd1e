"""Simulate a fleet rollout: N devices in one process, one mosquitto, one push.

    .venv/bin/python scripts/fleet_sim.py --devices 200 [--chunk-size 16384] [--no-load]

Starts a throw-away mosquitto (with $SYS every second), connects N simulated
devices (scripts/fleetsim.py: one paho client each, one selector loop; each runs
the real manifest/chunk/verify/store code and loads the model in LiteRT),
signs a re-described copy of the shipped model as v2, pushes it with the real
operator code, and prints the time until every device reported it active and
the broker traffic it took (from mosquitto's $SYS counters and from counting
what the devices received).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

from fleetsim import SimFleet, SysStats, summarise

from agent.broker import LocalBroker
from agent.fleet.manifest import generate_key
from agent.fleet.operator import Broker, push_release, sign_release
from agent.scoring import builtin_models_dir, find_model, load_card


def make_release(work: Path, chunk_size: int) -> tuple[Path, str]:
    pem, pub = generate_key()
    (work / "ops.pem").write_bytes(pem)
    src = work / "skab-ae-v2"
    src.mkdir()
    shipped = builtin_models_dir() / "skab-ae"
    data = (shipped / "model.tflite").read_bytes().replace(b"MLIR Converted.", b"fleet-sim v2   ")
    card = json.loads((shipped / "model.json").read_text())
    card.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (src / "model.tflite").write_bytes(data)
    (src / "model.json").write_text(json.dumps(card))
    rel = work / "release"
    sign_release(src, work / "ops.pem", version=2, out=rel, key_id="ops", chunk_size=chunk_size)
    return rel, pub


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--chunk-size", type=int, default=16384)
    ap.add_argument("--no-load", action="store_true", help="skip loading the model in LiteRT")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp, \
            LocalBroker(extra="sys_interval 1\nmax_queued_messages 100000\n") as broker:
        work = Path(tmp)
        rel, pub = make_release(work, args.chunk_size)
        m = json.loads((rel / "manifest.json").read_text())
        base = load_card(find_model("skab-ae", work))
        fleet = SimFleet(args.devices, host="127.0.0.1", port=broker.port, root=work / "devices",
                         trusted={"ops": pub}, base_card=base, load=not args.no_load)
        sys_stats = SysStats("127.0.0.1", broker.port)
        try:
            connect_s = fleet.start()
            before = sys_stats.fresh()
            t_push = time.time()
            pushed = push_release(rel, Broker("127.0.0.1", broker.port), group="default")
            ok = fleet.wait(lambda d: d.activated_at is not None or d.state == "rejected",
                            args.timeout)
            after = sys_stats.fresh()
            figures = summarise(fleet, t_push, before, after)
        finally:
            fleet.stop()
            sys_stats.close()
    print(f"devices: {args.devices} (one paho client each, one selector loop thread); "
          f"connected and subscribed in {connect_s:.2f} s")
    print(f"release: {m['size']} bytes in {pushed.messages - 1} chunk(s) of "
          f"{args.chunk_size} + manifest; push took {pushed.seconds:.3f} s")
    print(f"all done: {ok}; active: {figures['active']}/{figures['devices']}, "
          f"errors: {figures['errors']}")
    print(f"time to full rollout: p50 {figures['rollout_s_p50']} s, "
          f"max {figures['rollout_s_max']} s (from the push to each device's activation)")
    print(f"devices received: {figures['device_messages']} messages, "
          f"{figures['device_payload_bytes']} payload bytes")
    b = figures["broker"]
    print(f"broker ($SYS delta, includes statuses, SUBACKs, PUBACKs, $SYS itself): "
          f"sent {b.get('bytes_sent')} bytes / {b.get('messages_sent')} messages, "
          f"received {b.get('bytes_received')} bytes / {b.get('messages_received')} messages")


if __name__ == "__main__":
    main()
