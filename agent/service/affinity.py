"""Running the agent on one CPU (``service.cpu``).

Python runs one thread at a time. The agent has several (MQTT ingest, inference, the
committer, the uplink), and when the scheduler spreads them over cores each hand-over
of that turn crosses cores: on the 2-core development machine the agent then spent 39
µs of CPU per message at 25k msg/s, against 26 µs at 41k msg/s on one core
(``scripts/bench.py``, docs/benchmarks.md). So by default the agent pins itself, and the threads it
starts afterwards inherit the pin, to one of the CPUs it may use: the highest-numbered
(on a Raspberry Pi, CPU 0 takes most interrupts). A stream that asks its backend for
more than one thread keeps every CPU: its model calls run outside that turn.
"""

from __future__ import annotations

import contextlib
import os

from agent.config import AgentConfig

__all__ = ["choose_cpu", "cpu_problem", "pin_cpu"]


def _allowed() -> set[int]:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


def choose_cpu(cfg: AgentConfig) -> int | None:
    """The CPU ``service.cpu`` asks for here; None: leave the agent to the scheduler."""
    want = cfg.service.cpu
    allowed = _allowed()
    if want == "none" or not allowed:
        return None
    if isinstance(want, int):
        return want
    if len(allowed) == 1 or any(s.backend_options.threads > 1 for s in cfg.streams):
        return None
    return max(allowed)


def cpu_problem(cfg: AgentConfig) -> str | None:
    """A ``service.cpu`` this process may not run on, as a preflight line."""
    want = cfg.service.cpu
    allowed = _allowed()
    if isinstance(want, int) and allowed and want not in allowed:
        return (f"service.cpu: {want}: this process may run on CPUs "
                f"{', '.join(map(str, sorted(allowed)))} only")
    return None


def pin_cpu(cfg: AgentConfig) -> int | None:
    """Pin the process as ``choose_cpu`` says: every thread it has (a numeric library may
    have started some at import) and, through the calling thread, every one it starts
    later. Returns the CPU, or None when unpinned."""
    cpu = choose_cpu(cfg)
    if cpu is None:
        return None
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = []
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, {cpu})
    os.sched_setaffinity(0, {cpu})
    return cpu
