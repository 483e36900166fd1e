"""Loaded by every Python process started with this folder on PYTHONPATH and
ALERT_TRACE set (see scripts/trace_alert_path.py): in an `edge-agent run`, it
records when the reading that ended each alert's window arrived, when the alert
reaches the sink, the start of its commit and paho's publish, and writes them
to ``$ALERT_TRACE.<pid>`` every second (the benchmark ends its agents with
SIGKILL, so nothing is left for atexit)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

OUT = os.environ.get("ALERT_TRACE")


def _install(out: str) -> None:
    # Imported only in the traced agent: every Python process with this folder on
    # PYTHONPATH loads this file, the benchmark itself included.
    import paho.mqtt.client as mqtt  # noqa: PLC0415

    from agent import daemon, ingest  # noqa: PLC0415
    from agent.pipeline import Episode  # noqa: PLC0415
    from agent.uplink import committer, outbox  # noqa: PLC0415

    rec: list[tuple[str, float, float]] = []  # (what, alert ts, wall time)
    sink, commit, publish = daemon.Agent._sink, committer.Committer._commit, mqtt.Client.publish
    put = outbox.Outbox._put_many_locked
    on_message = ingest.LocalIngest._on_message
    # Every reading's arrival (its own ts -> wall time): the ones that ended an alert's
    # window are kept when the file is written.
    arrived: dict[float, float] = {}

    def traced_on_message(self: Any, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        try:
            ts = json.loads(msg.payload).get("ts")
        except (ValueError, AttributeError):
            ts = None
        if isinstance(ts, float):
            arrived[ts] = now
        on_message(self, client, userdata, msg)

    def traced_sink(self: Any, p: Any, events: list[Any]) -> None:
        now = time.time()
        rec.extend(("sink", e.ts, now) for e in events if isinstance(e, Episode))
        sink(self, p, events)

    def traced_commit(self: Any, group: list[Any]) -> None:
        start = time.time()
        rec.extend(("commit start", p.event.ts, start) for p in group
                   if isinstance(p.event, Episode))
        commit(self, group)

    def traced_put(self: Any, messages: Any) -> Any:
        seqs = put(self, messages)  # the transaction, fsync included, has returned
        done = time.time()
        rec.extend(("committed", m[3](0)["ts"], done) for m in messages if m[0] == "alert")
        return seqs

    def traced_publish(self: Any, topic: str, payload: Any = None, *a: Any, **kw: Any) -> Any:
        if "/alert/" in topic:
            rec.append(("publish", json.loads(payload)["ts"], time.time()))
        return publish(self, topic, payload, *a, **kw)

    daemon.Agent._sink = traced_sink  # type: ignore[method-assign]
    committer.Committer._commit = traced_commit  # type: ignore[method-assign]
    mqtt.Client.publish = traced_publish  # type: ignore[method-assign]
    outbox.Outbox._put_many_locked = traced_put  # type: ignore[method-assign]
    ingest.LocalIngest._on_message = traced_on_message  # type: ignore[method-assign]

    def dump() -> None:
        while True:
            time.sleep(1.0)
            if rec:
                got = [("arrived", ts, arrived[ts]) for what, ts, _ in list(rec)
                       if what == "sink" and ts in arrived]
                with open(f"{out}.{os.getpid()}", "w") as f:
                    json.dump(rec + got, f)

    threading.Thread(target=dump, daemon=True).start()


if OUT and "edge-agent" in " ".join(sys.argv):
    _install(OUT)
    if os.environ.get("ALERT_TRACE_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["ALERT_TRACE_SWITCH_INTERVAL"]))
