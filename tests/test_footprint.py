"""What an idle agent with the default config loads, and the RNGs it makes only on use.

Idle RSS is a target (issue 13: <= 60 MiB), so the imports that cost it are checked
here as facts, not as figures: the default config must not load pydantic,
prometheus_client, http.server, importlib.metadata or numpy.random.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import yaml

from agent.pipeline.calibrate import WARM_RESERVOIR, Calibrator
from tests.conftest import SKAB_FIELDS

NOT_AT_IDLE = ["pydantic", "prometheus_client", "http.server", "importlib.metadata",
               "numpy.random", "river", "sqlite_utils", "cryptography"]


def _loaded_after_start_up(tmp_path: Path, **service: object) -> set[str]:
    """The modules a default-config agent holds once built (the CLI module included)."""
    cfg = {"device_id": "dev1", "state_dir": str(tmp_path / "state"),
           "local": {"host": "127.0.0.1", "port": 1883},
           "upstream": {"host": "127.0.0.1", "port": 1883},
           "service": service,
           "streams": [{"name": "pump", "topic": "sensors/pump/+", "fields": SKAB_FIELDS}]}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import agent.cli
        from agent.config import load_config
        from agent.daemon import Agent
        from agent.service.service import AgentService
        a = Agent(load_config(Path({str(path)!r})))
        s = AgentService(a, Path({str(path)!r}))
        if s.health_server is not None:
            s.health_server.stop()
        print(" ".join(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    return set(out.stdout.split())


def test_default_config_loads_nothing_it_does_not_use(tmp_path: Path) -> None:
    loaded = _loaded_after_start_up(tmp_path)
    assert "agent.daemon" in loaded and "numpy" in loaded  # it did build the agent
    assert not [m for m in NOT_AT_IDLE if m in loaded]


def test_health_endpoint_still_loads_prometheus(tmp_path: Path) -> None:
    from agent.broker import free_port

    loaded = _loaded_after_start_up(tmp_path, health={"port": free_port()})
    assert "prometheus_client" in loaded


def _draws(c: Calibrator, n: int = 5) -> list[int]:
    return [int(c._rng.get().integers(0, 1 << 30)) for _ in range(n)]


def test_undrawn_rng_checkpoints_as_its_seeded_start() -> None:
    a = Calibrator(threshold=None, seed=7)
    a.learn_warm(np.ones(100))  # within the reservoir: nothing drawn
    state = a.to_state()
    assert state["rng"] is None
    b = Calibrator(threshold=None, seed=7)
    b.load_state(state)
    assert _draws(b) == _draws(Calibrator(threshold=None, seed=7))


def test_drawn_rng_restores_exactly() -> None:
    a = Calibrator(threshold=None, seed=7)
    a.learn_warm(np.linspace(0.0, 1.0, WARM_RESERVOIR + 50))  # overflows: draws
    state = a.to_state()
    assert isinstance(state["rng"], dict)  # numpy's own state, as checkpoints held before
    b = Calibrator(threshold=None, seed=99)
    b.load_state(state)
    assert _draws(b) == _draws(a)
