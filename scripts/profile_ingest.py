"""Microseconds per message on the ingest thread, by stage, without a broker.

    .venv/bin/python scripts/profile_ingest.py [--messages 40000] [--repeat 5]

Builds the agent of `scripts/bench.py` (one 8-field stream, window 16, hop 4, the
shipped int8 model, batch 64) without starting it, and feeds pre-serialised
JSON readings straight into paho's message handler (`_handle_on_message`: what
paho's network thread calls for each PUBLISH), so the figure is the agent's own
per-message cost: dispatch, decode, clock check, ring write and, every 64
windows, scoring the full batch inline. Then each stage alone:

- decode: `agent.decode.decode` of the same payload;
- ring: `StreamPipeline.append` of a decoded reading;
- score: `StreamPipeline.process` per window, in full batches of 64 and one by one.

Only public entry points and paho's handler are used, so the same script runs
against an older checkout (`PYTHONPATH=<checkout> .venv/bin/python ...`) for a
before/after table. Best of `--repeat` runs; compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

import agent
from agent.config import parse_config
from agent.daemon import Agent
from agent.decode import decode

FIELDS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
          "Thermocouple", "Voltage", "Volume Flow RateRMS"]
ROW = [0.21, 0.27, 2.4, 0.11, 89.5, 28.4, 228.6, 125.1]
T0 = 1_700_000_000.0
TOPIC = "bench/pump"


def build(tmp: Path, warmup: int, fmt: str = "json") -> Agent:
    raw = {
        "device_id": "bench", "state_dir": str(tmp / "state"), "log_level": "warning",
        "local": {"host": "127.0.0.1", "port": 1}, "upstream": {"host": "127.0.0.1", "port": 1},
        "streams": [{"name": "pump", "topic": TOPIC, "fields": FIELDS, "window": 16, "hop": 4,
                     "warmup": warmup, "batch": 64, "buffer": 65536, "summary_s": 0,
                     "format": fmt, "alert": {"threshold": "auto"}}],
    }
    return Agent(parse_config(raw, base_dir=Path(agent.__file__).resolve().parent.parent))


def payloads(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    noise = 1 + 0.01 * rng.standard_normal((256, len(ROW)))
    return [json.dumps({"ts": T0 + i, **dict(zip(FIELDS, (ROW * noise[i % 256]).round(3).tolist(),
                                                strict=True))}).encode() for i in range(n)]


def message(payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=TOPIC.encode())
    msg.payload = payload
    return msg


def frame_payloads(fmt: str, size: int, n: int) -> list[bytes]:
    """``n`` frames of ``size`` samples, consecutive in time, as JSON or f32."""
    rng = np.random.default_rng(1)
    out = []
    for k in range(n):
        x = (ROW * (1 + 0.01 * rng.standard_normal((size, len(ROW))))).round(3)
        t0 = T0 + k * size * 0.01
        if fmt == "json":
            body = {"ts": (t0 + 0.01 * np.arange(size)).round(3).tolist(),
                    **{f: x[:, i].tolist() for i, f in enumerate(FIELDS)}}
            out.append(json.dumps(body).encode())
        else:
            head = struct.pack("<BBHdf", 1, 0, len(FIELDS), t0, 0.01)
            out.append(head + x.astype("<f4").tobytes())
    return out


def frames(tmp: Path, repeat: int) -> None:
    """Samples per second through the handler for frames, scoring included (hop 4)."""
    print("frames through the handler (decode, ring, inline scoring of full batches):")
    for fmt, size in (("json", 32), ("f32", 32), ("f32", 256)):
        try:
            a = build(tmp / f"{fmt}{size}", warmup=400, fmt=fmt)
        except Exception as e:  # an older checkout without the format
            print(f"  {fmt} x {size}: not available here ({type(e).__name__})")
            continue
        msgs = [message(b) for b in frame_payloads(fmt, size, 40_000 // size)]
        handle = a.local._handle_on_message
        for m in msgs[: max(1, 2000 // size)]:
            handle(m)
        a.process_ready()

        def feed(a: Agent = a, msgs: list[mqtt.MQTTMessage] = msgs,
                 handle=handle) -> None:  # type: ignore[no-untyped-def]
            for m in msgs:
                handle(m)
            a.process_ready()

        spent = best(feed, repeat)
        got = len(msgs) * size
        print(f"  {fmt:4s} x {size:3d} samples ({len(msgs[0].payload):6d} bytes): "
              f"{spent / len(msgs) * 1e6:8.1f} us per frame, {got / spent:12,.0f} samples/s")
        a.outbox.close()


def best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=40_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, r = args.messages, args.repeat
    tmp = Path(tempfile.mkdtemp(prefix="edge-agent-profile-"))
    msgs = [message(p) for p in payloads(n)]

    # Past the warm-up first, so the figures are those of a calibrated stream.
    a = build(tmp / "a", warmup=400)
    handle = a.local._handle_on_message
    for m in msgs[:2000]:
        handle(m)
    a.process_ready()
    p = a.streams[0]

    def feed() -> None:
        for m in msgs:
            handle(m)
        a.process_ready()  # what the inference thread would score: a partial batch at most

    scored0 = p.windows_scored
    total = best(feed, r) / n * 1e6
    scored = (p.windows_scored - scored0) / r / n

    bodies = [m.payload for m in msgs]
    now = T0 + 1e6
    t_decode = best(lambda: [decode(b, "json", FIELDS, now) for b in bodies], r) / n * 1e6
    readings = [decode(b, "json", FIELDS, now) for b in bodies]
    b = build(tmp / "b", warmup=0)
    q = b.streams[0]
    t_ring = best(lambda: [q.append(ts, v) for ts, v in readings], r) / n * 1e6
    q.process()

    x = np.array([v for _, v in readings[:4096]], dtype=np.float32)
    ts = np.array([t for t, _ in readings[:4096]])
    q.append(ts[:16], x[:16])
    q.process()

    def score(batch_size: int) -> float:
        done = 0
        spent = 0.0
        for i in range(16, len(x) - 4, 4):
            q.append(ts[i:i + 4], x[i:i + 4])
            if q.ring.ready() >= batch_size:
                t0 = time.perf_counter()
                before = q.windows_scored
                q.process()
                spent += time.perf_counter() - t0
                done += q.windows_scored - before
        return spent / max(done, 1) * 1e6

    t_score64 = min(score(64) for _ in range(r))
    t_score1 = min(score(1) for _ in range(r))
    a.outbox.close()
    b.outbox.close()

    print(f"agent: {Path(agent.__file__).resolve().parent}")
    print(f"one 8-field JSON reading per message ({len(bodies[0])} bytes), window 16 hop 4, "
          f"batch 64; best of {r} x {n} messages")
    print(f"  ingest thread, whole message (dispatch..ring, inline scoring)  {total:6.2f} us "
          f"per message ({scored:.3f} windows scored per message)")
    print(f"  decode (agent.decode.decode)                                  {t_decode:6.2f} us")
    print(f"  ring (StreamPipeline.append of one reading)                   {t_ring:6.2f} us")
    print(f"  score, full batches of 64                                     {t_score64:6.2f} us "
          f"per window = {t_score64 / 4:5.2f} us per message at hop 4")
    print(f"  score, one window per call                                    {t_score1:6.2f} us "
          f"per window = {t_score1 / 4:5.2f} us per message at hop 4")
    print(f"  rest (dispatch, clock check, bookkeeping) = whole - decode - ring - score/4 "
          f"(batches of 64): {total - t_decode - t_ring - t_score64 / 4:6.2f} us")
    frames(tmp, r)


if __name__ == "__main__":
    main()
