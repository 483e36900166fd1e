"""Upstream message bodies for pipeline events: what the cloud receives on which topic."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from agent.pipeline.events import Drift, Episode, Event, Summary

__all__ = ["Message", "describe", "finite_or_none", "message_for", "with_clock_note"]

# (outbox class, topic, body given its seq)
Message = tuple[str, str, Callable[[int], dict[str, Any]]]


def finite_or_none(x: float | None) -> float | None:
    """JSON has no infinity: an unset or infinite threshold goes upstream as null."""
    return x if x is not None and math.isfinite(x) else None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def message_for(e: Event, device: str, prefix: str) -> Message | None:
    """The outbox entry for an event, or None for events that stay on the device."""
    if isinstance(e, Episode):
        body: dict[str, Any] = {
            "device": device, "stream": e.stream, "event": e.kind, "episode": e.episode,
            "ts": e.ts, "started": e.started, "threshold": _r(e.threshold),
            "anomaly_score": _r(e.anomaly_score), "model": e.model,
            "model_version": e.model_version, "window": e.window,
        }
        if e.kind == "alert":
            body["score"] = _r(e.score)
        else:
            body.update(ended=e.ended, duration_s=_r(e.duration_s), peak_score=_r(e.score),
                        relearned=e.relearned)
        return "alert", f"{prefix}/{device}/alert/{e.stream}", lambda seq: {**body, "seq": seq}
    if isinstance(e, Summary):
        sbody = {**e.body, "device": device}
        return ("summary", f"{prefix}/{device}/summary/{e.stream}",
                lambda seq: {**sbody, "seq": seq})
    if isinstance(e, Drift):
        dbody = {
            "device": device, "stream": e.stream, "ts": e.ts, "event": "drift",
            "detector": e.detector,
            "drifts": [{"kind": d.kind, "field": d.field, "estimate": round(d.estimate, 6)}
                       for d in e.drifts],
            "threshold": finite_or_none(e.threshold), "model": e.model,
            "model_version": e.model_version,
        }
        return ("event", f"{prefix}/{device}/event/{e.stream}",
                lambda seq: {**dbody, "seq": seq})
    return None


def with_clock_note(build: Callable[[int], dict[str, Any]]) -> Callable[[int], dict[str, Any]]:
    """The same body, saying its time is the agent's receive time (device clock unset)."""
    return lambda seq: {**build(seq), "ts_source": "agent"}


def describe(e: Episode | Drift) -> str:
    """The log text for an alert, an episode's end or drift (summaries get no line)."""
    if isinstance(e, Episode):
        return (f"{e.kind} on {e.stream}: episode {e.episode}, score {e.score:.4g}, "
                f"threshold {e.threshold:.4g}")
    return f"drift on {e.stream}: {', '.join(d.field or d.kind for d in e.drifts)}"
