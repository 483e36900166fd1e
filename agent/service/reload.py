"""What a config reload (SIGHUP) changes, and which of those changes apply live."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from agent.config import AgentConfig, StreamConfig

__all__ = ["LIVE_KEYS", "config_changes", "is_live", "merge_live"]

# Dotted paths (streams as ``streams[*]``) that a running agent applies on reload.
# Everything else (brokers, topics, models, windows, state_dir, the health
# endpoint) is wired into threads, sockets and buffers at start and needs a restart.
LIVE_KEYS = (
    "log_level",
    "upstream.status_interval_s",
    "service.stall_after_s",
    "service.ready_timeout_s",  # only read before READY; nothing to restart for
    "streams[*].alert.threshold",
    "streams[*].alert.quantile",
    "streams[*].alert.margin",
    "streams[*].alert.consecutive",
    "streams[*].alert.clear_windows",
    "streams[*].alert.clear_ratio",
    "streams[*].alert.onset_windows",
    "streams[*].alert.cooldown_s",
)

_STREAM_RE = re.compile(r"^streams\[[^\]]*\]")


def is_live(path: str) -> bool:
    """True when a change at ``path`` takes effect without a restart."""
    return _STREAM_RE.sub("streams[*]", path) in LIVE_KEYS


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new) and type(old) is type(new):
        for f in dataclasses.fields(old):
            if f.metadata.get("internal"):
                continue
            sub = f"{path}.{f.name}" if path else f.name
            _diff(getattr(old, f.name), getattr(new, f.name), sub, out)
    elif old != new:
        out.append(path)


def config_changes(old: AgentConfig, new: AgentConfig) -> list[str]:
    """Dotted paths of every option that differs; streams are matched by name."""
    out: list[str] = []
    for f in dataclasses.fields(old):
        if f.metadata.get("internal") or f.name == "streams":
            continue
        _diff(getattr(old, f.name), getattr(new, f.name), f.name, out)
    old_streams = {s.name: s for s in old.streams}
    new_streams = {s.name: s for s in new.streams}
    for name, s in old_streams.items():
        if name not in new_streams:
            out.append(f"streams[{name}] (removed)")
        else:
            _diff(s, new_streams[name], f"streams[{name}]", out)
    out.extend(f"streams[{name}] (added)" for name in new_streams if name not in old_streams)
    return out


def merge_live(old: AgentConfig, new: AgentConfig) -> AgentConfig:
    """``old`` with the live options taken from ``new``; everything else stays as running."""
    by_name = {s.name: s for s in new.streams}

    def stream(s: StreamConfig) -> StreamConfig:
        n = by_name.get(s.name)
        return s if n is None else dataclasses.replace(s, alert=n.alert)

    return dataclasses.replace(
        old,
        log_level=new.log_level,
        upstream=dataclasses.replace(old.upstream,
                                     status_interval_s=new.upstream.status_interval_s),
        service=dataclasses.replace(old.service, stall_after_s=new.service.stall_after_s,
                                    ready_timeout_s=new.service.ready_timeout_s),
        streams=[stream(s) for s in old.streams],
    )
