"""Scorers: models run by a backend, and model-free detectors, behind one interface."""

from __future__ import annotations

from agent.scoring.base import Scorer, StateError
from agent.scoring.card import (
    ModelCard,
    ModelError,
    builtin_models_dir,
    detector_card,
    find_model,
    load_card,
)
from agent.scoring.registry import SCORERS, open_scorer
from agent.scoring.slot import ModelSlot

__all__ = ["SCORERS", "ModelCard", "ModelError", "ModelSlot", "Scorer", "StateError",
           "builtin_models_dir", "detector_card", "find_model", "load_card", "open_scorer"]
