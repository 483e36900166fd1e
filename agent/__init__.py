"""edge-agent: an MQTT edge agent that scores sensor windows with quantized models."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from agent.app import Agent
from agent.config import AgentConfig, ConfigError, load_config

__all__ = ["Agent", "AgentConfig", "ConfigError", "__version__", "load_config"]
