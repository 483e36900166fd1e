"""Inference backends, one per file, registered in one explicit dict."""

from __future__ import annotations

from agent.backends.base import Backend, BackendUnavailable
from agent.backends.litert import LiteRTBackend

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "LiteRTBackend"]

# model format (as in a model card's "format") -> backend class
BACKENDS: dict[str, type[Backend]] = {
    LiteRTBackend.KEY: LiteRTBackend,
}
