"""Is the pipeline progressing: the checks behind the watchdog, /healthz and STATUS=.

Apart from the HTTP endpoint (agent/service/health.py) so that an agent with the
endpoint off, the default, never imports prometheus_client or http.server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.daemon import Agent

__all__ = ["Health", "check_pipeline"]


@dataclass(frozen=True)
class Health:
    """``problems``: wedged; ``degraded``: it runs but may lose what it cannot store;
    ``warnings``: it runs (a broker is away, messages wait in the outbox)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_pipeline(agent: Agent, stall_after_s: float,
                   now: Callable[[], float] = time.monotonic) -> Health:
    """Wedged (a thread died, or no inference step for ``stall_after_s``) or degraded."""
    problems = [f"{name} thread is not running"
                for name, alive in agent.threads_alive().items() if not alive]
    # The inference thread steps at least every IDLE_TICK_S even with no data, so
    # a stale step means it is stuck (in the model, the outbox, or on a lock).
    since = now() - agent.last_progress
    if since > stall_after_s:
        problems.append(f"no inference step for {since:.0f} s")
    warnings = []
    if not agent.local_connected.is_set():
        warnings.append(_broker_warning("local broker not connected", agent.ingest.conn))
    if not agent.uplink.connected.is_set():
        warnings.append(_broker_warning(
            f"upstream broker not connected (backlog {len(agent.outbox)})", agent.uplink.conn))
    degraded = []
    ob = agent.outbox.health()
    if ob["degraded"]:
        degraded.append(f"outbox degraded: {ob['degraded']} ({ob['memory_queue']} message(s) "
                        f"waiting in memory, {ob['dropped']} dropped)")
    return Health(problems, warnings, degraded)


def _broker_warning(text: str, conn: Any) -> str:
    return f"{text}: {conn.where}: {conn.last_error}" if conn.last_error else text
