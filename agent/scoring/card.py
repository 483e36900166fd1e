"""Model cards: finding a model, reading its card, checking the card against the file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ModelCard", "ModelError", "ModelFile", "builtin_models_dir", "detector_card",
           "find_model", "load_card"]

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 * 1024 * 1024  # a card that claims more is refused before reading
# How a model's output becomes a window score (agent/scoring/model.py): the mean squared or
# absolute reconstruction error, or the model's own single output.
SCORE_KINDS = ("reconstruction_mse", "reconstruction_mae", "direct")


class ModelError(ValueError):
    """A model or detector that cannot be used; the message says why."""


@dataclass(frozen=True)
class ModelFile:
    """One file of a model in one format (a card has its own, and may list ``variants``)."""

    format: str
    path: Path
    sha256: str
    size: int


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
    # The same model in other formats (e.g. model.onnx next to model.tflite), each checked
    # like the main file; the registry opens the one the stream's backend runs best.
    variants: tuple[ModelFile, ...] = ()
    # Per field, what the model was trained with: level, or diff (the window's own mean
    # removed first, for slow channels). None: every field as is.
    transforms: tuple[str, ...] | None = None

    @property
    def files(self) -> tuple[ModelFile, ...]:
        """The card's own file first, then its variants."""
        return (ModelFile(self.format, self.path, self.sha256, self.size), *self.variants)

    def with_file(self, f: ModelFile) -> ModelCard:
        """This card describing ``f`` as its file (what a backend opening ``f`` is given)."""
        return dataclasses.replace(self, format=f.format, path=f.path, sha256=f.sha256,
                                   size=f.size, variants=())


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
    from agent.scoring.registry import SCORERS  # noqa: PLC0415  (the registry imports cards)

    if fmt not in SCORERS:
        raise ModelError(f"{card_path}: format {fmt!r} has no backend here "
                         f"(known: {', '.join(k for k, v in SCORERS.items() if v.file_based)})")
    if score_kind not in SCORE_KINDS:
        raise ModelError(f"{card_path}: score kind {score_kind!r} is not supported "
                         f"(known: {', '.join(SCORE_KINDS)})")
    main = _checked_file(card_path, fmt, file_name, sha, size)
    variants = []
    raw_variants = raw.get("variants") or []
    if not isinstance(raw_variants, list):
        raise ModelError(f"{card_path}: variants must be a list")
    for i, v in enumerate(raw_variants):
        try:
            vf, vname = str(v["format"]), str(v["file"])
            vsha, vsize = str(v["sha256"]).lower(), int(v["size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{card_path}: variants[{i}] is missing or has a bad {e}") from e
        if vf not in SCORERS or not SCORERS[vf].file_based:
            log.info("%s: variant %s (%s) skipped: no backend for that format here",
                     card_path, vname, vf)
            continue
        if Path(vname).name != vname or vname in ("", ".", "..", file_name):
            raise ModelError(f"{card_path}: variants[{i}].file must be another plain file "
                             f"name, got {vname!r}")
        if not (card_path.parent / vname).is_file():
            # A release may carry one format only (fleet delivers the one this device runs).
            log.debug("%s: variant %s not present; skipped", card_path, vname)
            continue
        variants.append(_checked_file(card_path, vf, vname, vsha, vsize))
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
    return ModelCard(name=name, version=version, format=fmt, path=main.path, sha256=sha,
                     size=size, window=window, fields=fields, mean=mean, std=std,
                     score_kind=score_kind, raw=raw, variants=tuple(variants),
                     transforms=tuple(transforms) if transforms is not None else None)


def _checked_file(card_path: Path, fmt: str, name: str, sha: str, size: int) -> ModelFile:
    """A model file whose size and sha256 are the card's (else ModelError)."""
    file = card_path.parent / name
    if not 0 < size <= MAX_MODEL_BYTES:
        raise ModelError(f"{card_path}: size {size} of {name} outside 1..{MAX_MODEL_BYTES}")
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
    return ModelFile(fmt, file, sha, size)


def detector_card(name: str, fmt: str, window: int, fields: tuple[str, ...]) -> ModelCard:
    """The card a model-free detector reports: no file, identity preprocessing."""
    c = len(fields)
    return ModelCard(name=name, version=0, format=fmt, path=Path(), sha256="", size=0,
                     window=window, fields=fields, mean=np.zeros(c, np.float32),
                     std=np.ones(c, np.float32), score_kind=fmt, raw={})
