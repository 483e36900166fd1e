"""service.cpu: the agent runs on one CPU unless told otherwise (agent/service/affinity.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.service.affinity import choose_cpu
from agent.service.preflight import preflight

from .conftest import AgentProcess, agent_config, write_config

ALLOWED = sorted(os.sched_getaffinity(0))


def _cfg(tmp_path: Path, cpu: object = None, threads: int = 1):
    raw = agent_config(tmp_path, 1883)
    if cpu is not None:
        raw["service"] = {"cpu": cpu}
    raw["streams"][0]["backend_options"] = {"threads": threads}
    return parse_config(raw, base_dir=tmp_path)


def test_auto_picks_the_highest_allowed_cpu_unless_a_backend_wants_threads(tmp_path):
    auto = None if len(ALLOWED) == 1 else ALLOWED[-1]
    assert choose_cpu(_cfg(tmp_path)) == auto  # the default is auto
    assert choose_cpu(_cfg(tmp_path, threads=2)) is None
    assert choose_cpu(_cfg(tmp_path, cpu="none")) is None
    assert choose_cpu(_cfg(tmp_path, cpu=ALLOWED[0])) == ALLOWED[0]


def test_a_cpu_this_process_may_not_use_is_a_preflight_problem(tmp_path):
    outside = max(ALLOWED) + 1
    problems = preflight(_cfg(tmp_path, cpu=outside), models=False)
    assert f"service.cpu: {outside}: this process may run on CPUs " in "\n".join(problems)
    assert not [p for p in preflight(_cfg(tmp_path, cpu=ALLOWED[0]), models=False)
                if p.startswith("service.cpu")]


def _threads_cpus(pid: int) -> dict[int, set[int]]:
    return {int(t): set(os.sched_getaffinity(int(t)))
            for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("cpu", ["auto", "none"])
def test_the_running_agent_and_every_thread_it_starts_stay_on_the_chosen_cpu(
        tmp_path, broker, cpu):
    cfg = agent_config(tmp_path, broker.port)
    cfg["service"] = {"cpu": cpu}
    proc = AgentProcess(write_config(tmp_path, cfg))
    try:
        assert proc.wait_log("subscribed to"), proc.output()
        threads = _threads_cpus(proc.proc.pid)
        assert len(threads) >= 4  # main, ingest (paho), inference, committer, uplink...
        want = ({ALLOWED[-1]} if cpu == "auto" and len(ALLOWED) > 1 else set(ALLOWED))
        assert all(c == want for c in threads.values()), threads
        shown = "any" if want == set(ALLOWED) and (cpu == "none" or len(ALLOWED) == 1) \
            else str(ALLOWED[-1])
        assert f"running on CPU {shown} (service.cpu: {cpu})" in proc.output()
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()
