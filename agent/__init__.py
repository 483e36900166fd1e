"""edge-agent: an MQTT edge agent that scores sensor windows with quantized models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The one place the version is written (pyproject.toml reads it from here): asking
# importlib.metadata instead costs every start ~60 ms and ~1 MiB (it imports email).
__version__ = "0.1.0"

from agent.config import AgentConfig, ConfigError, load_config

if TYPE_CHECKING:
    from agent.daemon import Agent
    from agent.pipeline import StreamPipeline

__all__ = ["Agent", "AgentConfig", "ConfigError", "StreamPipeline", "__version__",
           "load_config"]


def __getattr__(name: str) -> Any:
    # Lazily: the daemon pulls in paho, the pipeline numpy; `import agent` stays light.
    if name == "Agent":
        from agent.daemon import Agent  # noqa: PLC0415

        return Agent
    if name == "StreamPipeline":
        from agent.pipeline import StreamPipeline  # noqa: PLC0415

        return StreamPipeline
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
