"""Fleet model delivery: signed manifests, chunked transfer, model store, canary, rollback."""

from __future__ import annotations

from agent.fleet.manifest import ModelManifest, Refusal, canonical_json
from agent.fleet.store import ModelStore

__all__ = ["ModelManifest", "ModelStore", "Refusal", "canonical_json"]
