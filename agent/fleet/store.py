"""The on-device model store: versions side by side, the active one picked by a symlink.

Layout under ``{state_dir}/models``::

    incoming/{sha256}.part            a transfer in progress
    {name}/versions/{version}-{sha12}/ model.tflite + model.json (complete, or absent)
    {name}/active   -> versions/...   the model the agent loads
    {name}/previous -> versions/...   where a rollback goes
    {name}/rejected.json              manifests refused or rolled back (never retried)

A version directory is written under a temporary name, fsynced and renamed
into place, so it either exists whole or not at all. ``active`` and
``previous`` are switched by creating a new symlink and ``rename()``-ing it over
the old one (atomic on POSIX), then fsyncing the directory: a crash at any
moment leaves each link pointing at a complete version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.fleet.manifest import ModelManifest
from agent.scoring import ModelCard, ModelError, load_card
from agent.state import fsync_dir as _fsync_dir
from agent.state import write_atomic as _write_atomic

__all__ = ["ModelStore", "StoredVersion"]

log = logging.getLogger(__name__)

# Versions kept on disk besides active and previous (SD cards are small).
KEEP_OTHER_VERSIONS = 1
# rejected.json keeps this many entries (oldest dropped): enough to never
# re-download what the retained manifests still offer.
REJECTED_MAX = 100

StepHook = Callable[[str], None]


class StoredVersion:
    """One complete version directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        ver, _, sha12 = path.name.partition("-")
        self.version = int(ver)
        self.sha12 = sha12

    @property
    def card_path(self) -> Path:
        return self.path / "model.json"

    def __repr__(self) -> str:
        return f"StoredVersion({self.path.name})"


class ModelStore:
    """Versions of delivered models and which one is active, under one directory."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self._clock = clock
        self._lock = threading.Lock()  # rejected.json read-modify-write

    # -- paths ----------------------------------------------------------------------

    def incoming(self, sha256: str) -> Path:
        d = self.root / "incoming"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{sha256}.part"

    def _model_dir(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir()
                      if d.is_dir() and (d / "versions").is_dir())

    def versions(self, name: str) -> list[StoredVersion]:
        d = self._model_dir(name) / "versions"
        if not d.is_dir():
            return []
        out = [StoredVersion(p) for p in d.iterdir()
               if p.is_dir() and not p.name.startswith(".") and p.name.split("-")[0].isdigit()]
        return sorted(out, key=lambda v: v.version)

    def find(self, name: str, version: int, sha256: str) -> StoredVersion | None:
        """A complete version directory for this exact file, if one was staged before."""
        d = self._model_dir(name) / "versions" / f"{version}-{sha256[:12]}"
        return StoredVersion(d) if (d / "model.json").is_file() else None

    def _link(self, name: str, which: str) -> StoredVersion | None:
        link = self._model_dir(name) / which
        try:
            target = os.readlink(link)
        except OSError:
            return None
        path = (link.parent / target).resolve()
        return StoredVersion(path) if path.is_dir() else None

    def active(self, name: str) -> StoredVersion | None:
        return self._link(name, "active")

    def previous(self, name: str) -> StoredVersion | None:
        return self._link(name, "previous")

    # -- writing ----------------------------------------------------------------------

    def stage(self, m: ModelManifest, part: Path, on_step: StepHook | None = None) -> StoredVersion:
        """Move a verified ``.part`` file into a complete version directory."""
        versions = self._model_dir(m.name) / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        final = versions / f"{m.version}-{m.sha256[:12]}"
        if final.is_dir():
            part.unlink(missing_ok=True)
            return StoredVersion(final)  # delivered before (e.g. a re-sent manifest)
        tmp = versions / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        card = m.card()
        with part.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, tmp / card["file"])
        _write_atomic(tmp / "model.json", json.dumps(card, indent=2).encode())
        _fsync_dir(tmp)
        if on_step:
            on_step("staged-tmp")
        os.replace(tmp, final)
        _fsync_dir(versions)
        if on_step:
            on_step("staged")
        return StoredVersion(final)

    def _set_link(self, name: str, which: str, target: StoredVersion | None) -> None:
        d = self._model_dir(name)
        link = d / which
        if target is None:
            link.unlink(missing_ok=True)
        else:
            tmp = d / f".{which}.{os.getpid()}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(target.path, d), tmp)
            os.replace(tmp, link)
        _fsync_dir(d)

    def activate(self, name: str, v: StoredVersion, on_step: StepHook | None = None) -> None:
        """Make ``v`` active; the version it replaces becomes ``previous``."""
        current = self.active(name)
        if current is not None and current.path != v.path:
            # previous first: a crash between the two renames leaves
            # previous == active, both complete.
            self._set_link(name, "previous", current)
            if on_step:
                on_step("previous-linked")
        self._set_link(name, "active", v)
        if on_step:
            on_step("active-linked")
        self._prune(name)

    def rollback(self, name: str) -> StoredVersion:
        """Make ``previous`` active again; raise ModelError when there is none."""
        prev = self.previous(name)
        if prev is None:
            raise ModelError(f"{name}: no previous version to roll back to")
        self._set_link(name, "active", prev)
        self._set_link(name, "previous", None)
        return prev

    def switch_back(self, name: str) -> StoredVersion | None:
        """Make ``previous`` active, or with none the configured model; what is active now."""
        if self.previous(name) is None:
            self.deactivate(name)
            return None
        return self.rollback(name)

    def deactivate(self, name: str) -> None:
        """Forget the store's active version: the agent falls back to its configured model."""
        self._set_link(name, "active", None)

    def discard(self, v: StoredVersion) -> None:
        """Remove a version that is neither active nor previous."""
        name = v.path.parent.parent.name
        if v.path in {x.path for x in (self.active(name), self.previous(name)) if x}:
            return
        shutil.rmtree(v.path, ignore_errors=True)

    def _prune(self, name: str) -> None:
        keep = {x.path for x in (self.active(name), self.previous(name)) if x}
        others = [v for v in self.versions(name) if v.path not in keep]
        for v in others[:max(0, len(others) - KEEP_OTHER_VERSIONS)]:
            shutil.rmtree(v.path, ignore_errors=True)
        versions = self._model_dir(name) / "versions"
        for tmp in versions.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-stage

    # -- refusals remembered across restarts -------------------------------------------

    def _rejected_path(self, name: str) -> Path:
        return self._model_dir(name) / "rejected.json"

    # -- the trial in progress (survives a crash) ------------------------------------

    @property
    def _trial_path(self) -> Path:
        return self.root / "trial.json"

    def begin_trial(self, name: str, version: int, sha256: str, phase: str) -> int:
        """Record (atomically) that a version is being tried; returns the attempt number.

        A marker still there at the next start means the agent died during the trial
        (a crash in the model, the OOM killer, the watchdog, a power cut).
        """
        prev = self.trial()
        same = prev is not None and (prev["name"], prev["version"], prev["sha256"]) == (
            name, version, sha256)
        attempts = int(prev.get("attempts", 1)) if same and prev else 1
        data = {"name": name, "version": version, "sha256": sha256, "phase": phase,
                "attempts": attempts}
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self._trial_path, json.dumps(data).encode())
        return attempts

    def trial(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self._trial_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and {"name", "version", "sha256"} <= set(data) \
            else None

    def end_trial(self) -> None:
        self._trial_path.unlink(missing_ok=True)

    def bump_trial(self) -> dict[str, Any] | None:
        """At start-up: count the interrupted attempt; the marker, or None if there was none."""
        t = self.trial()
        if t is None:
            return None
        t["attempts"] = int(t.get("attempts", 1)) + 1
        _write_atomic(self._trial_path, json.dumps(t).encode())
        return t

    def rejected(self, name: str) -> dict[str, dict[str, Any]]:
        """sha256 -> {version, code, reason, ts} of manifests never to install again."""
        try:
            data = json.loads(self._rejected_path(name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def reject(self, name: str, sha256: str, version: int, code: str, reason: str) -> None:
        with self._lock:
            d = self._model_dir(name)
            d.mkdir(parents=True, exist_ok=True)
            data = self.rejected(name)
            data[sha256] = {"version": version, "code": code, "reason": reason,
                            "ts": self._clock()}
            while len(data) > REJECTED_MAX:
                data.pop(next(iter(data)))
            _write_atomic(self._rejected_path(name), json.dumps(data, indent=1).encode())

    # -- reading -----------------------------------------------------------------------

    def load_active(self, name: str) -> ModelCard | None:
        """The active version's card, else previous's if active is unusable, else None."""
        for which in ("active", "previous"):
            v = self._link(name, which)
            if v is None:
                continue
            try:
                return load_card(v.card_path)
            except ModelError as e:
                log.error("stored model %s (%s, %s) is unusable: %s", name, which, v.path.name, e)
        return None
