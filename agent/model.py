"""Models: finding them, checking their card against the file, scoring windows."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.backends import BACKENDS, Backend

__all__ = ["ModelCard", "ModelError", "Scorer", "builtin_models_dir", "find_model", "load_card"]

MAX_MODEL_BYTES = 64 * 1024 * 1024  # a card that claims more is refused before reading


class ModelError(ValueError):
    """A model that cannot be used; the message says why."""


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


def builtin_models_dir() -> Path:
    """The shipped models: ``models/`` of a source checkout, or the installed package data."""
    src = Path(__file__).resolve().parent.parent / "models"
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
        file = card_path.parent / str(raw.get("file", "model.tflite"))
        name, version = str(raw["name"]), int(raw["version"])
        score_kind = str((raw.get("score") or {}).get("kind", "reconstruction_mse"))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{card_path}: model card is missing or has a bad {e}") from e
    if fmt not in BACKENDS:
        raise ModelError(f"{card_path}: format {fmt!r} has no backend here "
                         f"(known: {', '.join(BACKENDS)})")
    if not 0 < size <= MAX_MODEL_BYTES:
        raise ModelError(f"{card_path}: size {size} outside 1..{MAX_MODEL_BYTES}")
    if score_kind != "reconstruction_mse":
        raise ModelError(f"{card_path}: score kind {score_kind!r} is not supported")
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
    return ModelCard(name=name, version=version, format=fmt, path=file, sha256=sha, size=size,
                     window=window, fields=fields, mean=mean, std=std, score_kind=score_kind,
                     raw=raw)


class Scorer:
    """Scores normalised windows with one model: run the backend, reconstruction error."""

    def __init__(self, card: ModelCard, max_batch: int) -> None:
        self.card = card
        try:
            self.backend: Backend = BACKENDS[card.format](card.path, max_batch)
        except ValueError as e:
            raise ModelError(str(e)) from e
        flat = card.window * len(card.fields)
        if math.prod(self.backend.input_shape) != flat:
            raise ModelError(f"{card.path}: model input {self.backend.input_shape} does not hold "
                             f"window {card.window} x {len(card.fields)} fields")
        if self.backend.output_shape != self.backend.input_shape:
            raise ModelError(f"{card.path}: reconstruction model needs output shape == input shape")
        self.max_batch = max_batch

    def score(self, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Mean squared reconstruction error per normalised (n, window, channels) window."""
        n = windows.shape[0]
        x = windows.reshape(n, *self.backend.input_shape)
        recon = self.backend.predict(x)
        # float64: a reading near float32's range squares to infinity in float32.
        err = recon.astype(np.float64) - x
        np.square(err, out=err)
        mean = err.reshape(n, -1).mean(axis=1)
        with np.errstate(over="ignore"):
            scores: npt.NDArray[np.float32] = mean.astype(np.float32)
        return scores
