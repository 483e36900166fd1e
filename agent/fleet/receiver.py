"""Device side of a model delivery: manifest checks, chunk assembly, hash check, staging.

``ModelReceiver`` is transport-agnostic: it is handed manifest and chunk
payloads and talks back through a small ``Link`` (subscribe, unsubscribe,
publish the retained status). The agent drives it from its fleet worker
thread; the fleet simulation drives it from its event loop. It is not
thread-safe: one caller thread at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.decode import LogLimiter
from agent.fleet.manifest import ModelManifest, Refusal, parse_manifest, verify_manifest
from agent.fleet.store import ModelStore, StoredVersion

__all__ = ["Link", "ModelReceiver", "ReceiverLimits", "Transfer"]

log = logging.getLogger(__name__)

# Progress is reported at most this often while chunks arrive (a retained
# message per report, per device: keep it coarse).
PROGRESS_INTERVAL_S = 1.0
# Refusals that cost a download to find out are remembered on disk so a
# retained manifest re-delivered on every reconnect is not fetched again.
# Transient ones (a transfer that timed out) are retried.
PERSISTENT_REFUSALS = frozenset({"hash_mismatch", "load_failed", "input_mismatch",
                                 "canary_failed", "watch_failed", "operator_rollback",
                                 "bad_chunk"})


# Bounds against a publisher that floods manifest topics or junk hashes.
DEFERRED_MAX = 64
REPORTED_MAX = 1024

class Link(Protocol):
    """What the receiver needs from an MQTT connection."""

    def subscribe(self, topic_filter: str) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...

    def publish_status(self, payload: bytes) -> None: ...


@dataclass(frozen=True)
class ReceiverLimits:
    max_model_bytes: int
    max_chunk_bytes: int
    download_timeout_s: float
    resubscribe_after_s: float


class Transfer:
    """One model file arriving in chunks, written in place into a preallocated ``.part``."""

    def __init__(self, m: ModelManifest, path: Path, now: float) -> None:
        self.manifest = m
        self.path = path
        self._f = path.open("wb")
        self._f.truncate(m.size)
        self.have = bytearray(m.chunks)
        self.received = 0
        self.started = now
        self.last_activity = now
        self.resubscribes = 0
        self.duplicates = 0

    def write(self, index: int, data: bytes) -> None:
        """Store chunk ``index``; Refusal if its length is not the manifest's."""
        m = self.manifest
        if self.have[index]:
            # Already verified-by-length: a stale or junk duplicate must not sink the release.
            self.duplicates += 1
            return
        want = m.chunk_len(index)
        if len(data) < want:
            raise Refusal("truncated", f"{m.name} v{m.version}: chunk {index} has {len(data)} "
                                       f"bytes, the manifest says {want}")
        if len(data) > want:
            raise Refusal("bad_chunk", f"{m.name} v{m.version}: chunk {index} has {len(data)} "
                                       f"bytes, the manifest says {want}")
        self._f.seek(index * m.chunk_size)
        self._f.write(data)
        self.have[index] = 1
        self.received += 1

    @property
    def complete(self) -> bool:
        return self.received == self.manifest.chunks

    def verify(self) -> None:
        """Flush, then check the whole file's sha256 against the manifest."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        with self.path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        m = self.manifest
        if digest != m.sha256:
            raise Refusal("hash_mismatch", f"{m.name} v{m.version}: received file has sha256 "
                                           f"{digest[:12]}..., the manifest says "
                                           f"{m.sha256[:12]}...")

    def abandon(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.path.unlink(missing_ok=True)


class ModelReceiver:
    """Checks manifests, fetches and verifies their files, hands staged versions on."""

    def __init__(
        self,
        *,
        device_id: str,
        group: str,
        prefix: str,
        trusted: dict[str, Ed25519PublicKey],
        store: ModelStore,
        limits: ReceiverLimits,
        link: Link,
        fits: Callable[[ModelManifest], None],
        current: Callable[[str], tuple[int, str] | None],
        busy: Callable[[ModelManifest], bool],
        on_staged: Callable[[ModelManifest, StoredVersion], None],
        active_models: Callable[[], dict[str, int]],
        clock: Callable[[], float] = time.time,
        formats: Callable[[ModelManifest], list[str]] | None = None,
    ) -> None:
        self.device_id = device_id
        self.group = group
        self.prefix = prefix
        self.trusted = trusted
        self.store = store
        self.limits = limits
        self.link = link
        self._fits = fits
        self._current = current
        self._busy = busy
        self._on_staged = on_staged
        self._active_models = active_models
        self._clock = clock
        # The formats this device runs for a model, best first (default: the device's).
        self._formats = formats
        self.transfer: Transfer | None = None
        self._deferred: dict[str, bytes] = {}  # manifest topic -> payload, while busy
        self.dropped_manifests = 0
        self._reported: dict[str, str] = {}  # sha256 -> code already reported this run
        self._last_progress = 0.0
        self.status_topic = f"{prefix}/{device_id}/model/status"
        self.blob_prefix = f"{prefix}/blobs/"
        self.stray_chunks = 0
        self.refusals = 0
        # Anyone who can publish a manifest could otherwise write a WARNING line each.
        self._refusal_log = LogLimiter(log)

    def manifest_filters(self) -> list[str]:
        return [f"{self.prefix}/fleet/{self.group}/model/+",
                f"{self.prefix}/{self.device_id}/model/+"]

    def blob_filter(self, sha256: str) -> str:
        return f"{self.blob_prefix}{sha256}/+"

    # -- status --------------------------------------------------------------------

    def report(self, state: str, name: str | None, version: int | None, *,
               code: str | None = None, reason: str | None = None, **extra: Any) -> None:
        """Publish the retained model status (downloading, staged, canary, active, ...)."""
        body: dict[str, Any] = {
            "device": self.device_id, "group": self.group, "ts": round(self._clock(), 3),
            "state": state, "model": name, "version": version,
        }
        if code is not None:
            body["code"] = code
            body["reason"] = reason
        body.update(extra)
        body["active"] = self._active_models()
        self.link.publish_status(json.dumps(body, separators=(",", ":")).encode())

    def refuse(self, m: ModelManifest | None, r: Refusal, name: str | None = None,
               *, state: str = "rejected") -> None:
        """Report a refusal once per manifest and remember the costly ones."""
        self.refusals += 1
        model = m.name if m else name
        version = m.version if m else None
        self._refusal_log.warning("model %s v%s %s: %s", model, version, state, r.message)
        if m is not None and r.code in PERSISTENT_REFUSALS:
            self.store.reject(m.name, m.sha256, m.version, r.code, r.message)
        key = m.sha256 if m else f"?{name}"
        if self._reported.get(key) == r.code:
            return  # a retained manifest re-delivered on reconnect: said it already
        self._reported[key] = r.code
        while len(self._reported) > REPORTED_MAX:  # oldest first: junk cannot grow memory
            del self._reported[next(iter(self._reported))]
        self.report(state, model, version, code=r.code, reason=r.message)

    # -- manifests -----------------------------------------------------------------

    def handle_manifest(self, topic: str, payload: bytes) -> None:
        if not payload or topic == self.status_topic:
            return  # a cleared retained manifest, or our own status (it shares the filter)
        if self.transfer is not None and not topic.endswith(f"/{self.transfer.manifest.name}"):
            if len(self._deferred) >= DEFERRED_MAX and topic not in self._deferred:
                self.dropped_manifests += 1  # a flood of topics: bounded, counted
                return
            self._deferred[topic] = payload  # one transfer at a time; latest per topic wins
            return
        name = topic.rsplit("/", 1)[-1]
        m: ModelManifest | None = None
        try:
            m = parse_manifest(payload)
            if m.name != name:
                raise Refusal("bad_manifest", f"manifest for {m.name!r} published on {topic}")
            verify_manifest(m, self.trusted, self._clock())
            m = self._select(m)
            if not self._check(m):
                return
        except Refusal as r:
            self.refuse(m, r, name)
            return
        if self.transfer is not None:
            if self.transfer.manifest.sha256 == m.sha256:
                self._resubscribe()  # re-delivered after a reconnect: fetch what is missing
                return
            log.info("model %s v%d supersedes the transfer of v%d", m.name, m.version,
                     self.transfer.manifest.version)
            self._end_transfer()
        self._start(m)

    def _select(self, m: ModelManifest) -> ModelManifest:
        """The release's file this device runs best; Refusal if it runs none of them."""
        if self._formats is not None:
            runs = self._formats(m)
        else:
            from agent.scoring.registry import device_formats  # noqa: PLC0415

            runs = device_formats()
        offered = m.formats()
        best = next((f for f in runs if f in offered), None)
        if best is None:
            raise Refusal("unsupported_format", f"{m.name} v{m.version}: format(s) "
                                                f"{', '.join(offered)} have no backend here "
                                                f"(this device runs {', '.join(runs) or 'none'})")
        return m.select(best)

    def _check(self, m: ModelManifest) -> bool:
        """Policy checks on an authentic manifest: Refusal, False (nothing to do), or True."""
        cur = self._current(m.name)
        # Refused before: the same file *and* version. A re-signed manifest with a new
        # version (say, its input spec corrected) is a new decision, not a re-delivery.
        refused = self.store.rejected(m.name).get(m.sha256)
        if ((cur is not None and cur[1] == m.sha256)
                or (refused is not None and refused.get("version") == m.version)
                or self._busy(m)):
            # A re-delivery (retained manifests come again on every connect).
            log.debug("model %s v%d: already active, on trial or refused before; ignored",
                      m.name, m.version)
            return False
        self._fits(m)
        if cur is not None and m.version <= cur[0] and not m.rollback:
            raise Refusal("not_newer", f"{m.name} v{m.version} is not newer than the active "
                                       f"v{cur[0]} (and not a signed rollback)")
        lim = self.limits
        if m.size > lim.max_model_bytes:
            raise Refusal("too_large", f"{m.name} v{m.version}: {m.size} bytes is over this "
                                       f"device's cap of {lim.max_model_bytes}")
        if m.chunk_size > lim.max_chunk_bytes:
            raise Refusal("too_large", f"{m.name} v{m.version}: chunks of {m.chunk_size} bytes "
                                       f"are over this device's cap of {lim.max_chunk_bytes}")
        return True

    def _start(self, m: ModelManifest) -> None:
        staged = self.store.find(m.name, m.version, m.sha256)
        if staged is not None:
            # Received and verified before a restart (its card's sha256 is checked
            # again when it loads): skip the download.
            log.info("model %s v%d: already staged, not downloading again", m.name, m.version)
            self._on_staged(m, staged)
            return
        now = self._clock()
        self.transfer = Transfer(m, self.store.incoming(m.sha256), now)
        self._last_progress = now
        log.info("model %s v%d: downloading %d bytes in %d chunk(s)", m.name, m.version, m.size,
                 m.chunks)
        self.report("downloading", m.name, m.version, progress=[0, m.chunks])
        self.link.subscribe(self.blob_filter(m.sha256))

    def _resubscribe(self) -> None:
        t = self.transfer
        if t is None:
            return
        t.resubscribes += 1
        t.last_activity = self._clock()
        # A fresh SUBSCRIBE makes the broker send the retained chunks again.
        f = self.blob_filter(t.manifest.sha256)
        self.link.unsubscribe(f)
        self.link.subscribe(f)

    def _end_transfer(self, abandon: bool = True) -> None:
        t = self.transfer
        if t is None:
            return
        self.transfer = None
        self.link.unsubscribe(self.blob_filter(t.manifest.sha256))
        if abandon:
            t.abandon()

    def pop_deferred(self) -> dict[str, bytes]:
        """Manifests that arrived during a transfer; the owner decides when to run them.

        Running them here, right after a transfer, would start a second rollout while
        the first is still in canary (the manager holds one rollout at a time).
        """
        out, self._deferred = self._deferred, {}
        return out

    # -- chunks --------------------------------------------------------------------

    def handle_chunk(self, topic: str, payload: bytes) -> None:
        t = self.transfer
        parts = topic[len(self.blob_prefix):].split("/")
        if (t is None or len(parts) != 2 or parts[0] != t.manifest.sha256
                or not (parts[1].isascii() and parts[1].isdigit()) or len(parts[1]) > 9
                or int(parts[1]) >= t.manifest.chunks):
            self.stray_chunks += 1  # an old transfer's chunk, or junk
            return
        m = t.manifest
        now = self._clock()
        t.last_activity = now
        try:
            t.write(int(parts[1]), payload)
            if not t.complete:
                if now - self._last_progress >= PROGRESS_INTERVAL_S:
                    self._last_progress = now
                    self.report("downloading", m.name, m.version, progress=[t.received, m.chunks])
                return
            t.verify()
        except Refusal as r:
            self._end_transfer()
            self.refuse(m, r)
            return
        self._end_transfer(abandon=False)
        version = self.store.stage(m, t.path)
        log.info("model %s v%d: received and verified (%d chunks, %.2f s)", m.name, m.version,
                 m.chunks, now - t.started)
        self._on_staged(m, version)

    def tick(self) -> None:
        """Time-outs: re-subscribe a stalled transfer, give up on one that took too long."""
        t = self.transfer
        if t is None:
            return
        now = self._clock()
        if now - t.started >= self.limits.download_timeout_s:
            m = t.manifest
            self._end_transfer()
            self.refuse(m, Refusal("truncated", f"{m.name} v{m.version}: transfer incomplete "
                                                f"after {self.limits.download_timeout_s:g} s: "
                                                f"{t.received} of {m.chunks} chunks"))
        elif now - t.last_activity >= self.limits.resubscribe_after_s:
            log.info("model %s: no chunk for %.0f s, asking for the missing ones again",
                     t.manifest.name, now - t.last_activity)
            self._resubscribe()

