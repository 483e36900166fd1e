"""Checkpoints: one file per stream under ``state_dir/adapt/``, explicit and versioned.

A checkpoint is three parts: a one-line JSON header (schema, agent version,
the stream's fingerprint), a one-line JSON body (the pipeline's ``to_state()``
with every numpy array replaced by a reference), and an ``.npz`` archive of
those arrays, read with ``allow_pickle=False``. Nothing is ever unpickled. A
checkpoint from another schema, or for a stream whose fields, window or model
changed, is refused with one log line, set aside, and the stream recalibrates
from its warm-up.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SCHEMA", "StateMismatch", "checkpoint_path", "decode", "encode", "load", "reset",
           "save", "set_aside", "write_atomic"]

log = logging.getLogger(__name__)

# Bump when a component's to_state() changes shape; older checkpoints are then refused.
# 1 was the pickled format of edge-agent 0.1.
SCHEMA = 2
SUFFIX = ".state"
_ARRAY = "__ndarray__"


class StateMismatch(ValueError):
    """A checkpoint that does not belong to this agent's schema or this stream."""


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


def encode(header: dict[str, Any], state: dict[str, Any]) -> bytes:
    """Header line, body line, then the arrays as an npz archive."""
    arrays: dict[str, np.ndarray[Any, Any]] = {}

    def strip(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            key = f"a{len(arrays)}"
            arrays[key] = x
            return {_ARRAY: key}
        if isinstance(x, dict):
            return {str(k): strip(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [strip(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        return x

    body = json.dumps(strip(state), sort_keys=True).encode()
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return json.dumps(header, sort_keys=True).encode() + b"\n" + body + b"\n" + buf.getvalue()


def decode(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    head, sep, rest = data.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError as e:
        raise StateMismatch("unreadable header") from e
    if not sep or not isinstance(header, dict):
        raise StateMismatch("unreadable header")
    body, _, blob = rest.partition(b"\n")
    return header, body, blob


def _restore(body: bytes, blob: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}

    def fill(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {_ARRAY}:
                return arrays[x[_ARRAY]]
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fill(v) for v in x]
        return x

    state = fill(json.loads(body))
    if not isinstance(state, dict):
        raise ValueError("body is not an object")
    return state


def save(path: Path, fingerprint: dict[str, Any], state: dict[str, Any]) -> int:
    """Write a stream's state atomically (temp file, fsync, rename); the bytes written."""
    from agent import __version__  # noqa: PLC0415

    header = {"schema": SCHEMA, "agent": __version__, "fingerprint": fingerprint}
    data = encode(header, state)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return len(data)


def load(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state, or None when there is none; StateMismatch when it does not fit."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    header, body, blob = decode(data)
    schema = header.get("schema", header.get("format"))
    if schema != SCHEMA:
        raise StateMismatch(f"written by state schema {schema!r} (agent "
                            f"{header.get('agent', '?')}); this agent reads schema {SCHEMA}")
    if header.get("fingerprint") != fingerprint:
        raise StateMismatch("the stream or its model changed since it was written")
    try:
        return _restore(body, blob)
    except Exception as e:  # a damaged file (BadZipFile, truncation, ...): recalibrate
        raise StateMismatch(f"corrupt checkpoint: {type(e).__name__}: {e}") from e


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
