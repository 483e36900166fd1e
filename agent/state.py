"""Adaptation checkpoints: one file per stream under ``state_dir/adapt/``.

A checkpoint is a one-line JSON header (format, river version, agent version,
the stream's fingerprint) followed by a pickle. The header is checked before
anything is unpickled: a checkpoint written by another river version, or for
a stream whose fields, window or model changed, is set aside and the stream
starts fresh. Only files this agent wrote under its own state directory are
ever unpickled; nothing that arrives over the network is.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "StateMismatch", "checkpoint_path", "load", "reset", "river_version",
           "save"]

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".state"


class StateMismatch(ValueError):
    """A checkpoint that does not belong to this agent, river or stream."""


def river_version() -> str:
    """The installed river's version, without importing river (that costs ~80 MB)."""
    try:
        return version("river")
    except PackageNotFoundError:
        return "absent"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def checkpoint_path(state_dir: Path, stream: str) -> Path:
    return state_dir / "adapt" / f"{stream}{SUFFIX}"


def save(path: Path, fingerprint: dict[str, Any], blob: bytes) -> int:
    """Write a pickled state atomically (temp file, fsync, rename); return the bytes written."""
    from agent import __version__  # noqa: PLC0415  (agent/__init__ imports app)

    header = {"format": FORMAT, "river": river_version(), "agent": __version__,
              "fingerprint": fingerprint}
    data = json.dumps(header, sort_keys=True).encode() + b"\n" + blob
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return len(data)


def load(path: Path, fingerprint: dict[str, Any]) -> Any:
    """The saved state, or None when there is none; StateMismatch when it does not fit."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    head, sep, body = data.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError as e:
        raise StateMismatch(f"{path}: unreadable header") from e
    if not sep or not isinstance(header, dict):
        raise StateMismatch(f"{path}: unreadable header")
    if header.get("format") != FORMAT:
        raise StateMismatch(f"{path}: format {header.get('format')!r}, this agent reads {FORMAT}")
    if header.get("river") != river_version():
        raise StateMismatch(f"{path}: written with river {header.get('river')}, "
                            f"this agent runs river {river_version()}")
    if header.get("fingerprint") != fingerprint:
        raise StateMismatch(f"{path}: stream or model changed since it was written "
                            f"({header.get('fingerprint')} != {fingerprint})")
    try:
        return pickle.loads(body)  # noqa: S301  (our own file under state_dir; see module doc)
    except Exception as e:
        raise StateMismatch(f"{path}: corrupt checkpoint: {e}") from e


def set_aside(path: Path) -> Path:
    """Move a checkpoint that cannot be used out of the way (kept for inspection)."""
    dest = path.with_suffix(f"{SUFFIX}.rejected")
    os.replace(path, dest)
    return dest


def reset(state_dir: Path, stream: str) -> bool:
    """Forget a stream's adaptation state; True if there was any."""
    path = checkpoint_path(state_dir, stream)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
