"""edge-agent: an MQTT edge agent that scores sensor windows with quantized models."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

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
