"""The one scorer registry: a card's ``format`` -> how to open a scorer for a stream.

Adding a backend is one file (a ``Backend`` subclass) and one entry here made
with ``backend_entry``; a model-free detector is one file and one entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, StreamConfig, detector_for
from agent.scoring.artime import ArtimeDetector
from agent.scoring.backend import Backend
from agent.scoring.base import Scorer
from agent.scoring.card import ModelCard, ModelError, detector_card, find_model, load_card
from agent.scoring.gauss import WindowedGaussianDetector
from agent.scoring.gaussian import GaussianDetector
from agent.scoring.hst import HalfSpaceDetector
from agent.scoring.knn import KnnDetector
from agent.scoring.litert import LiteRTBackend
from agent.scoring.model import ModelScorer
from agent.scoring.online import OnlineDetector
from agent.scoring.pca import PcaDetector

__all__ = ["SCORERS", "ScorerEntry", "backend_entry", "open_scorer", "open_stream_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerEntry:
    make: Callable[[ModelCard, StreamConfig], Scorer]
    file_based: bool  # a model file a card describes (fleet can deliver it), or a detector


def backend_entry(cls: type[Backend]) -> ScorerEntry:
    """A registry entry that runs a model file with ``cls`` and scores its output."""
    return ScorerEntry(lambda card, s: ModelScorer(card, cls(card.path, s.batch)), True)


def _gaussian(card: ModelCard, s: StreamConfig) -> Scorer:
    a = s.adapt
    return GaussianDetector(len(s.fields), hop=s.hop, halflife=a.gauss_halflife,
                            short=a.gauss_short)


def _hst(card: ModelCard, s: StreamConfig) -> Scorer:
    a = s.adapt
    return HalfSpaceDetector(tuple(s.fields), n_trees=a.hst_trees, height=a.hst_height,
                             window_size=a.hst_window, seed=a.seed)


def online_entry(cls: type[Any]) -> ScorerEntry:
    """A registry entry for a single-channel detector that learns as it scores."""
    return ScorerEntry(lambda card, s: OnlineDetector(
        cls(hop=s.hop, warmup=s.warmup, seed=s.adapt.seed)), False)


SCORERS: dict[str, ScorerEntry] = {
    LiteRTBackend.KEY: backend_entry(LiteRTBackend),
    WindowedGaussianDetector.KEY: online_entry(WindowedGaussianDetector),
    ArtimeDetector.KEY: online_entry(ArtimeDetector),
    KnnDetector.KEY: online_entry(KnnDetector),
    GaussianDetector.KEY: ScorerEntry(_gaussian, False),
    HalfSpaceDetector.KEY: ScorerEntry(_hst, False),
    PcaDetector.KEY: ScorerEntry(lambda card, s: PcaDetector(
        n_fields=len(s.fields), window=s.window, hop=s.hop), False),
}


def open_scorer(card: ModelCard, s: StreamConfig) -> Scorer:
    """A scorer for ``card`` on stream ``s``; whatever goes wrong becomes a ModelError."""
    entry = SCORERS.get(card.format)
    if entry is None:
        raise ModelError(f"{card.name}: format {card.format!r} has no backend here "
                         f"(known: {', '.join(SCORERS)})")
    try:
        return entry.make(card, s)
    except ModelError:
        raise
    except Exception as e:  # an import, a runtime or a file error: never a crash
        raise ModelError(f"{card.name} v{card.version} ({card.format}): could not be "
                         f"loaded: {type(e).__name__}: {e}") from e


def _check_fit(card: ModelCard, s: StreamConfig) -> ModelCard:
    if s.normalise == "model" and "mean" not in (card.raw.get("preprocessing") or {}):
        raise ModelError(f"model {card.name} carries no scaling statistics (it learns them on "
                         f"the device); use normalise: warmup")
    if card.window != s.window:
        raise ModelError(f"model {card.name} takes windows of {card.window} samples; "
                         f"stream has window {s.window}")
    if len(card.fields) != len(s.fields):
        raise ModelError(f"model {card.name} takes {len(card.fields)} channels; "
                         f"stream has {len(s.fields)} fields")
    return card


# model: none streams: the detector key -> the name its card reports
DETECTOR_NAMES = {"gaussian": "ewma-gaussian", "hst": "river-hst", "wgauss": "windowed-gaussian",
                  "artime": "fuzzy-art", "knn": "knn-cad", "pca": "pca-t2q"}


def open_stream_model(cfg: AgentConfig, s: StreamConfig) -> tuple[ModelCard, Scorer]:
    """A stream's card and scorer (a fleet-delivered model if one is active); ModelError."""
    if s.model == "none":
        key = detector_for(s)
        card = detector_card(DETECTOR_NAMES.get(key, key), key, s.window, tuple(s.fields))
        return card, open_scorer(card, s)
    card = load_card(find_model(s.model, Path(cfg.base_dir)))
    if cfg.fleet.enabled:
        # Imported only when fleet delivery is on: it pulls in cryptography (~10 MB RSS).
        from agent.fleet.manager import stored_card_for  # noqa: PLC0415

        delivered = stored_card_for(cfg, card)
        if delivered is not card:
            try:
                return _check_fit(delivered, s), open_scorer(delivered, s)
            except ModelError as e:
                log.error("delivered model %s v%d unusable here, using the configured one: %s",
                          delivered.name, delivered.version, e)
    return _check_fit(card, s), open_scorer(card, s)
