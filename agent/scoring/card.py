"""Model cards: finding a model, reading its card, checking the card against the file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ModelCard", "ModelError", "builtin_models_dir", "detector_card", "find_model",
           "load_card"]

MAX_MODEL_BYTES = 64 * 1024 * 1024  # a card that claims more is refused before reading
# How a model's output becomes a window score (agent/scoring/model.py): the mean squared or
# absolute reconstruction error, or the model's own single output.
SCORE_KINDS = ("reconstruction_mse", "reconstruction_mae", "direct")


class ModelError(ValueError):
    """A model or detector that cannot be used; the message says why."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: int
    format: str
    path: Path  # the model file
    sha256: str
    size: int
    window: int
    fields: tuple[str, ...]
    mean: npt.NDArray[np.float32]
    std: npt.NDArray[np.float32]
    score_kind: str
    raw: dict[str, Any]
    # Per field, what the model was trained with: level, or diff (the window's own mean
    # removed first, for slow channels). None: every field as is.
    transforms: tuple[str, ...] | None = None


def builtin_models_dir() -> Path:
    """The shipped models: ``models/`` of a source checkout, or the installed package data."""
    src = Path(__file__).resolve().parents[2] / "models"
    if src.is_dir():
        return src
    return Path(str(resources.files("agent") / "models"))


def find_model(ref: str, base_dir: Path) -> Path:
    """Resolve a config's ``model:`` to a card path (a dir, a ``.json``, or a shipped name)."""
    candidates = []
    p = Path(ref).expanduser()
    candidates.append(p if p.is_absolute() else base_dir / p)
    if not p.is_absolute() and len(p.parts) == 1:
        candidates.append(builtin_models_dir() / ref)
    for c in candidates:
        if c.is_dir() and (c / "model.json").is_file():
            return c / "model.json"
        if c.is_file() and c.suffix == ".json":
            return c
        if c.is_file() and c.with_suffix(".json").is_file():
            return c.with_suffix(".json")
        if c.is_file() and (c.parent / "model.json").is_file():
            return c.parent / "model.json"
    shipped = sorted(d.name for d in builtin_models_dir().iterdir() if (d / "model.json").is_file())
    raise ModelError(f"model {ref!r} not found (relative to {base_dir}, or shipped: "
                     f"{', '.join(shipped) or 'none'})")


def _floats(raw: Any, n: int, what: str) -> npt.NDArray[np.float32]:
    if not isinstance(raw, list) or len(raw) != n:
        raise ModelError(f"card: {what} must be a list of {n} numbers")
    arr = np.asarray(raw, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ModelError(f"card: {what} has non-finite values")
    return arr


def load_card(card_path: Path) -> ModelCard:
    """Read a model card and check that its model file is the one it describes."""
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{card_path}: unreadable model card: {e}") from e
    try:
        fmt = str(raw["format"])
        inp = raw["input"]
        fields = tuple(str(f) for f in inp["fields"])
        window = int(inp["window"])
        size = int(raw["size"])
        sha = str(raw["sha256"]).lower()
        pre = raw.get("preprocessing") or {}
        file_name = str(raw["file"])
        name, version = str(raw["name"]), int(raw["version"])
        score_kind = str((raw.get("score") or {}).get("kind", "reconstruction_mse"))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{card_path}: model card is missing or has a bad {e}") from e
    if Path(file_name).name != file_name or file_name in ("", ".", ".."):
        raise ModelError(f"{card_path}: file must be a plain file name, got {file_name!r}")
    file = card_path.parent / file_name
    from agent.scoring.registry import SCORERS  # noqa: PLC0415  (the registry imports cards)

    if fmt not in SCORERS:
        raise ModelError(f"{card_path}: format {fmt!r} has no backend here "
                         f"(known: {', '.join(k for k, v in SCORERS.items() if v.file_based)})")
    if not 0 < size <= MAX_MODEL_BYTES:
        raise ModelError(f"{card_path}: size {size} outside 1..{MAX_MODEL_BYTES}")
    if score_kind not in SCORE_KINDS:
        raise ModelError(f"{card_path}: score kind {score_kind!r} is not supported "
                         f"(known: {', '.join(SCORE_KINDS)})")
    try:
        actual = file.stat().st_size
    except OSError as e:
        raise ModelError(f"{file}: {e.strerror}") from e
    if actual != size:
        raise ModelError(f"{file}: {actual} bytes, card says {size} (truncated or replaced)")
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    if digest != sha:
        raise ModelError(f"{file}: sha256 {digest[:12]}... does not match the card's "
                         f"{sha[:12]}... (tampered or corrupted)")
    c = len(fields)
    if pre.get("normalisation", "zscore") == "zscore" and "mean" in pre:
        mean = _floats(pre["mean"], c, "preprocessing.mean")
        std = _floats(pre["std"], c, "preprocessing.std")
        if np.any(std <= 0):
            raise ModelError(f"{card_path}: preprocessing.std must be > 0")
    else:
        mean, std = np.zeros(c, np.float32), np.ones(c, np.float32)
    transforms = pre.get("transforms")
    if transforms is not None and (not isinstance(transforms, list) or len(transforms) != c
                                   or any(t not in ("level", "diff") for t in transforms)):
        raise ModelError(f"{card_path}: preprocessing.transforms must list level or diff for "
                         f"each of the {c} fields")
    return ModelCard(name=name, version=version, format=fmt, path=file, sha256=sha, size=size,
                     window=window, fields=fields, mean=mean, std=std, score_kind=score_kind,
                     raw=raw, transforms=tuple(transforms) if transforms is not None else None)


def detector_card(name: str, fmt: str, window: int, fields: tuple[str, ...]) -> ModelCard:
    """The card a model-free detector reports: no file, identity preprocessing."""
    c = len(fields)
    return ModelCard(name=name, version=0, format=fmt, path=Path(), sha256="", size=0,
                     window=window, fields=fields, mean=np.zeros(c, np.float32),
                     std=np.ones(c, np.float32), score_kind=fmt, raw={})
