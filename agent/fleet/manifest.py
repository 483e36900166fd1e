"""Signed model manifests: canonical JSON, Ed25519 signatures, strict parsing.

A manifest describes one model file (name, version, sha256, size, chunking,
input spec, preprocessing) and carries an Ed25519 signature over its canonical
JSON without the ``signature`` key. Devices trust public keys by key id from
their config; the private key never leaves the operator.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
# cryptography is imported where a key is used, not here: `edge-agent run` loads this
# module through the CLI, and cryptography costs ~10 MB RSS on a device without fleet.

__all__ = [
    "MANIFEST_MAX_BYTES",
    "ModelManifest",
    "Refusal",
    "build_manifest",
    "canonical_json",
    "generate_key",
    "load_private_key",
    "parse_manifest",
    "public_key_b64",
    "public_key_from_b64",
    "verify_manifest",
]

SCHEMA = 1
# A manifest is a few KB (mostly the card's preprocessing); anything far larger
# is refused before it is parsed.
MANIFEST_MAX_BYTES = 64 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class Refusal(Exception):
    """A manifest or transfer the device will not install; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def canonical_json(obj: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8, no NaN/inf."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class ModelManifest:
    """A parsed manifest; ``raw`` is the exact signed document (with its signature)."""

    name: str
    version: int
    format: str
    sha256: str
    size: int
    chunk_size: int
    chunks: int
    window: int
    fields: tuple[str, ...]
    created: float
    expires: float
    key_id: str
    rollback: bool
    signature: str | None
    raw: dict[str, Any]
    # The file chosen among the release's formats (``select``); None: the manifest's own.
    chosen_file: str | None = None

    def formats(self) -> list[str]:
        """The formats this release carries: its own, then its ``variants``."""
        return [str(self.raw.get("format", self.format))] + [
            str(v["format"]) for v in self.raw.get("variants") or []]

    def select(self, fmt: str) -> ModelManifest:
        """This manifest describing its ``fmt`` file (what the device downloads and stages)."""
        if fmt == self.raw.get("format"):
            return dataclasses.replace(self, format=fmt, sha256=str(self.raw["sha256"]),
                                       size=int(self.raw["size"]), chosen_file=None,
                                       chunks=math.ceil(int(self.raw["size"]) / self.chunk_size))
        v = next(v for v in self.raw.get("variants") or [] if v["format"] == fmt)
        return dataclasses.replace(self, format=fmt, sha256=v["sha256"], size=v["size"],
                                   chunks=math.ceil(v["size"] / self.chunk_size),
                                   chosen_file=v["file"])

    def signed_bytes(self) -> bytes:
        return canonical_json({k: v for k, v in self.raw.items() if k != "signature"})

    def chunk_len(self, index: int) -> int:
        """Bytes chunk ``index`` must carry (the last one holds the remainder)."""
        if index < self.chunks - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunks - 1)

    @property
    def file(self) -> str:
        """The model file's name in a release and in the store (``model.<format>`` if unset)."""
        if self.chosen_file is not None:
            return self.chosen_file
        return str(self.raw.get("file") or f"model.{self.format}")

    def card(self) -> dict[str, Any]:
        """A model card (as ``agent.model.load_card`` reads it) for the delivered file."""
        keep = ("name", "version", "format", "sha256", "size", "input", "output",
                "preprocessing", "score")
        card = {k: self.raw[k] for k in keep if k in self.raw}
        # The one file this device took from the release (variants are not delivered).
        card.update(format=self.format, sha256=self.sha256, size=self.size, file=self.file)
        card["fleet"] = {k: self.raw.get(k) for k in
                         ("created", "expires", "key_id", "rollback", "signature")}
        return card


# A model file name in a release: no directories, no hidden files.
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def _need(raw: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    v = raw.get(key)
    if isinstance(v, bool) and kind is not bool:
        raise Refusal("bad_manifest", f"manifest: {key} must be {_kind_name(kind)}")
    if not isinstance(v, kind):
        raise Refusal("bad_manifest", f"manifest: {key} must be {_kind_name(kind)}")
    return v


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def parse_manifest(payload: bytes) -> ModelManifest:
    """Parse and shape-check a manifest; signature and policy are checked separately."""
    try:
        return _parse_manifest(payload)
    except (RecursionError, OverflowError, TypeError, ValueError) as e:
        # Anything malformed is a refusal with a reason, never an error in the fleet thread.
        raise Refusal("bad_manifest", f"manifest is malformed: {type(e).__name__}: {e}"
                      ) from None


def _parse_manifest(payload: bytes) -> ModelManifest:
    if len(payload) > MANIFEST_MAX_BYTES:
        raise Refusal("bad_manifest", f"manifest is {len(payload)} bytes; "
                                      f"at most {MANIFEST_MAX_BYTES} accepted")
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise Refusal("bad_manifest", f"manifest is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise Refusal("bad_manifest", "manifest must be a JSON object")
    if raw.get("schema") != SCHEMA:
        raise Refusal("bad_manifest", f"manifest schema {raw.get('schema')!r} is not {SCHEMA}")
    name = _need(raw, "name", str)
    if not _NAME_RE.match(name) or name == "status":
        # "status" would collide with {prefix}/{device}/model/status.
        raise Refusal("bad_manifest", "manifest: name must be 1-64 letters, digits, _ . - "
                                      "(and not 'status')")
    version = _need(raw, "version", int)
    sha = _need(raw, "sha256", str)
    if not _SHA_RE.match(sha):
        raise Refusal("bad_manifest", "manifest: sha256 must be 64 lower-case hex digits")
    size = _need(raw, "size", int)
    chunk_size = _need(raw, "chunk_size", int)
    chunks = _need(raw, "chunks", int)
    if version < 1 or size < 1 or chunk_size < 1:
        raise Refusal("bad_manifest", "manifest: version, size and chunk_size must be >= 1")
    if chunks != math.ceil(size / chunk_size):
        raise Refusal("bad_manifest", f"manifest: {size} bytes in chunks of {chunk_size} "
                                      f"make {math.ceil(size / chunk_size)} chunks, not {chunks}")
    inp = _need(raw, "input", dict)
    fields = inp.get("fields")
    window = inp.get("window")
    if (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)
            or not isinstance(window, int) or isinstance(window, bool)):
        raise Refusal("bad_manifest", "manifest: input needs window (int) and fields (strings)")
    created = _need(raw, "created", (int, float))
    expires = _need(raw, "expires", (int, float))
    key_id = _need(raw, "key_id", str)
    rollback = raw.get("rollback", False)
    if not isinstance(rollback, bool):
        raise Refusal("bad_manifest", "manifest: rollback must be true or false")
    file = raw.get("file")
    if file is not None and (not isinstance(file, str) or not _FILE_RE.match(file)):
        raise Refusal("bad_manifest", "manifest: file must be a plain file name")
    variants = raw.get("variants", [])
    if not isinstance(variants, list) or len(variants) > 8:
        raise Refusal("bad_manifest", "manifest: variants must be a list of at most 8")
    seen = {raw.get("format")}
    for v in variants:
        if (not isinstance(v, dict) or not isinstance(v.get("format"), str)
                or not isinstance(v.get("file"), str) or not _FILE_RE.match(v["file"])
                or not isinstance(v.get("sha256"), str) or not _SHA_RE.match(v["sha256"])
                or not isinstance(v.get("size"), int) or isinstance(v.get("size"), bool)
                or v["size"] < 1 or v["format"] in seen):
            raise Refusal("bad_manifest", "manifest: each variant needs its own format, a "
                                          "plain file name, a sha256 and a size >= 1")
        seen.add(v["format"])
    sig = raw.get("signature")
    if sig is not None and not isinstance(sig, str):
        raise Refusal("bad_manifest", "manifest: signature must be a base64 string")
    return ModelManifest(
        name=name, version=version, format=_need(raw, "format", str), sha256=sha, size=size,
        chunk_size=chunk_size, chunks=chunks, window=window, fields=tuple(fields),
        created=float(created), expires=float(expires), key_id=key_id, rollback=rollback,
        signature=sig, raw=raw,
    )


def verify_manifest(m: ModelManifest, trusted: dict[str, Ed25519PublicKey], now: float) -> None:
    """Raise Refusal unless ``m`` is signed by a trusted key and not expired."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

    if not m.signature:
        raise Refusal("missing_signature", f"{m.name} v{m.version}: manifest is not signed")
    key = trusted.get(m.key_id)
    if key is None:
        raise Refusal("unknown_key", f"{m.name} v{m.version}: signed with key {m.key_id!r}, "
                                     f"which this device does not trust")
    try:
        sig = base64.b64decode(m.signature, validate=True)
        key.verify(sig, m.signed_bytes())
    except (InvalidSignature, binascii.Error, ValueError):
        raise Refusal("bad_signature", f"{m.name} v{m.version}: signature does not verify "
                                       f"with key {m.key_id!r}") from None
    # After the signature: an unverified expiry date means nothing.
    if m.expires <= now:
        raise Refusal("expired", f"{m.name} v{m.version}: manifest expired at {m.expires:.0f} "
                                 f"(now {now:.0f})")


def build_manifest(
    card: dict[str, Any],
    model: bytes,
    *,
    sha256: str,
    version: int,
    chunk_size: int,
    created: float,
    expires: float,
    key_id: str,
    key: Ed25519PrivateKey,
    rollback: bool = False,
) -> dict[str, Any]:
    """A signed manifest for ``model`` described by a model card."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "name": card["name"],
        "version": version,
        "format": card["format"],
        "file": card["file"],
        "sha256": sha256,
        "size": len(model),
        "chunk_size": chunk_size,
        "chunks": math.ceil(len(model) / chunk_size),
        "input": card["input"],
        "output": card.get("output", {}),
        "preprocessing": card.get("preprocessing", {}),
        "score": card.get("score", {"kind": "reconstruction_mse"}),
        # Other formats of this model in the release; each device downloads the one it runs
        # best (agent/scoring/registry.py device_formats).
        **({"variants": [{k: v[k] for k in ("format", "file", "sha256", "size")}
                         for v in card["variants"]]} if card.get("variants") else {}),
        "created": created,
        "expires": expires,
        "key_id": key_id,
        "rollback": rollback,
    }
    doc["signature"] = base64.b64encode(key.sign(canonical_json(doc))).decode()
    return doc


# -- keys ------------------------------------------------------------------------


def generate_key() -> tuple[bytes, str]:
    """A new Ed25519 key: (private key as PKCS#8 PEM, public key as base64 of the raw 32 bytes)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, public_key_b64(key)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """The form ``fleet.trusted_keys`` holds; ValueError if it is not a 32-byte key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PublicKey,
    )
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"not base64: {e}") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PKCS#8 PEM Ed25519 private key (as ``fleet keygen`` writes)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key
