"""The one scorer registry: a card's ``format`` -> how to open a scorer for a stream.

Model files are run by inference backends (``BACKENDS``: litert, onnxruntime, tensorrt),
each in its own file with its runtime imported only when it is opened, so a missing runtime
only disables that backend. A stream's ``backend`` picks one, or ``auto`` picks the best one
usable here for the formats its card carries (``plan_backends`` says which and why; if the
chosen one fails to open, auto falls back to the next with a warning). A model-free detector
is one file and one entry in ``SCORERS``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, BackendOptions, StreamConfig, detector_for
from agent.scoring.artime import ArtimeDetector
from agent.scoring.backend import Backend
from agent.scoring.base import Scorer
from agent.scoring.card import (
    ModelCard,
    ModelError,
    ModelFile,
    detector_card,
    find_model,
    load_card,
)
from agent.scoring.gauss import WindowedGaussianDetector
from agent.scoring.gaussian import GaussianDetector
from agent.scoring.hst import HalfSpaceDetector
from agent.scoring.knn import KnnDetector
from agent.scoring.model import ModelScorer
from agent.scoring.online import OnlineDetector
from agent.scoring.pca import PcaDetector

__all__ = ["BACKENDS", "SCORERS", "BackendSpec", "Choice", "ScorerEntry", "backend_entry",
           "device_formats", "open_scorer", "open_stream_model", "plan_backends"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerEntry:
    make: Callable[[ModelCard, StreamConfig], Scorer]
    file_based: bool  # a model file a card describes (fleet can deliver it), or a detector
    # Model formats: open through the stream's backend choice, with the state dir (engines).
    open_model: Callable[[ModelCard, StreamConfig, Path | None], Scorer] | None = None


# -- inference backends ------------------------------------------------------------------


def _options(s: Any) -> BackendOptions:
    # getattr: scripts/fleetsim.py passes a stand-in with only ``batch``.
    return getattr(s, "backend_options", None) or BackendOptions()


def _engine_dir(o: BackendOptions, state_dir: Path | None) -> Path | None:
    """Where built engines are cached: engine_cache (relative: under state_dir)."""
    if o.engine_cache:
        p = Path(o.engine_cache).expanduser()
        return p if p.is_absolute() or state_dir is None else state_dir / p
    return state_dir / "engines" if state_dir is not None else None


@dataclass(frozen=True)
class Choice:
    backend: str
    file: ModelFile
    reason: str
    delegate: str = ""  # litert: the external delegate to load
    accelerated: bool = False  # auto falls back from an accelerated choice that fails to open


def _open_litert(c: Choice, s: StreamConfig, state_dir: Path | None) -> Backend:
    from agent.scoring.litert import LiteRTBackend  # noqa: PLC0415

    o = _options(s)
    return LiteRTBackend(c.file.path, s.batch, num_threads=o.threads, delegate=c.delegate,
                         delegate_options=dict(o.delegate_options) if c.delegate else None)


def _open_onnxruntime(c: Choice, s: StreamConfig, state_dir: Path | None) -> Backend:
    from agent.scoring.onnx import OnnxRuntimeBackend  # noqa: PLC0415

    o = _options(s)
    trt_dir = _engine_dir(o, state_dir)
    return OnnxRuntimeBackend(c.file.path, s.batch, threads=o.threads, providers=o.providers,
                              trt_cache_dir=trt_dir / "ort" if trt_dir else None,
                              fp16=o.precision == "fp16")


def _open_tensorrt(c: Choice, s: StreamConfig, state_dir: Path | None) -> Backend:
    from agent.scoring.tensorrt import TensorRTBackend  # noqa: PLC0415

    o = _options(s)
    return TensorRTBackend(c.file.path, s.batch, precision=o.precision,
                           cache_dir=_engine_dir(o, state_dir), workspace_mb=o.workspace_mb,
                           fmt=c.file.format)


def _litert_missing(o: BackendOptions) -> str | None:
    if any(importlib.util.find_spec(m) is not None for m in ("ai_edge_litert", "tflite_runtime")):
        return None
    return "neither ai-edge-litert nor tflite-runtime is installed"


def _onnxruntime_missing(o: BackendOptions) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install 'edge-agent[onnx]')"
    return None


def _tensorrt_missing(o: BackendOptions) -> str | None:
    from agent.scoring.tensorrt import tensorrt_usable  # noqa: PLC0415

    return tensorrt_usable()


def _onnxruntime_gpu(o: BackendOptions) -> bool:
    from agent.scoring.onnx import GPU_PROVIDERS, available_providers, nvidia_gpu_present  # noqa: PLC0415

    wanted = o.providers or GPU_PROVIDERS
    return nvidia_gpu_present() and any(p in available_providers() for p in wanted
                                        if p in GPU_PROVIDERS)


@dataclass(frozen=True)
class BackendSpec:
    key: str  # the config's name for it
    formats: tuple[str, ...]  # card formats it runs
    missing: Callable[[BackendOptions], str | None]  # why it cannot run here, or None
    open: Callable[[Choice, StreamConfig, Path | None], Backend]


BACKENDS: dict[str, BackendSpec] = {
    "litert": BackendSpec("litert", ("tflite",), _litert_missing, _open_litert),
    "onnxruntime": BackendSpec("onnxruntime", ("onnx",), _onnxruntime_missing,
                               _open_onnxruntime),
    "tensorrt": BackendSpec("tensorrt", ("onnx", "engine"), _tensorrt_missing, _open_tensorrt),
}




def _first(card: ModelCard, formats: Sequence[str]) -> ModelFile | None:
    return next((f for f in card.files if f.format in formats), None)


def plan_backends(card: ModelCard, s: StreamConfig) -> tuple[list[Choice], list[str]]:
    """The backends to try for ``card`` on stream ``s``, best first, and why others are not.

    An explicit ``backend`` gives one choice (or none, with the reason); ``auto`` ranks:
    litert with the configured delegate; TensorRT on an NVIDIA GPU; onnxruntime with a GPU
    provider; the card's own format on the CPU (the file its scores were validated on); the
    other formats on the CPU.
    """
    o = _options(s)
    wanted = getattr(s, "backend", "auto")
    skipped: list[str] = []
    if wanted != "auto":
        spec = BACKENDS[wanted]
        f = _first(card, spec.formats)
        if f is None:
            have = ", ".join(x.format for x in card.files)
            return [], [f"{wanted}: runs {', '.join(spec.formats)}; model {card.name} has "
                        f"{have}"]
        why = spec.missing(o)
        if why:
            return [], [f"{wanted}: {why}"]
        return [Choice(wanted, f, f"configured (backend: {wanted})",
                       o.delegate if wanted == "litert" else "")], []
    ranked: list[tuple[str, Sequence[str], str]] = []  # accelerated ones before "own"
    if o.delegate:
        ranked.append(("litert+delegate", ("tflite",),
                       f"backend_options.delegate is {o.delegate!r}"))
    ranked.append(("tensorrt", ("engine", "onnx"), "TensorRT and an NVIDIA GPU are here"))
    if _onnxruntime_gpu(o):
        ranked.append(("onnxruntime", ("onnx",), "onnxruntime has a GPU execution provider "
                                                  "and a GPU is here"))
    own = next(k for k, b in BACKENDS.items() if card.format in b.formats and k != "tensorrt")
    ranked.append((own, (card.format,), f"the card's own format ({card.format}, the file its "
                                        f"scores were validated on) on the CPU"))
    for k, b in BACKENDS.items():
        if k != "tensorrt":
            ranked.append((k, b.formats, "another format of this model on the CPU"))
    out: list[Choice] = []
    n_accel = len(ranked) - 1 - sum(1 for k in BACKENDS if k != "tensorrt")
    for rank, (name, formats, reason) in enumerate(ranked):
        key, delegate = name.split("+")[0], o.delegate if name.endswith("+delegate") else ""
        f = _first(card, formats)
        if f is None or any(c.backend == key and c.file == f and c.delegate == delegate
                            for c in out):
            continue
        why = BACKENDS[key].missing(o)
        if why:
            skipped.append(f"{key}: {why}")
            continue
        out.append(Choice(key, f, reason, delegate, accelerated=rank < n_accel))
    return out, list(dict.fromkeys(skipped))


def _open_model(card: ModelCard, s: StreamConfig, state_dir: Path | None) -> Scorer:
    choices, skipped = plan_backends(card, s)
    if not choices:
        raise ModelError(f"{card.name}: no backend here can run it ({'; '.join(skipped)})")
    failures: list[str] = []
    for i, c in enumerate(choices):
        try:
            backend = BACKENDS[c.backend].open(c, s, state_dir)
            scorer = ModelScorer(card.with_file(c.file), backend)
        except Exception as e:  # a runtime, delegate or file error: next choice, or refuse
            failures.append(f"{c.backend} ({c.file.path.name}): {type(e).__name__}: {e}")
            # An accelerator that does not come up falls back; a model file the CPU backend
            # of its own format cannot open is refused (it is broken, not unsupported).
            if not c.accelerated or i == len(choices) - 1:
                raise ModelError(f"{card.name} v{card.version}: could not be loaded: "
                                 f"{'; '.join(failures)}") from e
            nxt = choices[i + 1]
            log.warning("model %s: backend %s failed to open (%s); auto falls back to %s%s",
                        card.name, c.backend, e, nxt.backend,
                        " without the delegate" if c.delegate and not nxt.delegate else "")
            continue
        with_delegate = f" with delegate {c.delegate}" if c.delegate else ""
        note = f"{c.backend}{with_delegate} on {c.file.path.name}: {c.reason}"
        if failures:
            note += f" (after: {'; '.join(failures)})"
        backend.selection = note
        return scorer
    raise ModelError(f"{card.name}: no backend opened")  # unreachable: the loop raises


def _model_entry() -> ScorerEntry:
    return ScorerEntry(lambda card, s: _open_model(card, s, None), True, _open_model)


def device_formats(s: StreamConfig | None = None) -> list[str]:
    """Model formats this device runs for stream ``s`` (default options), best first.

    The same ranking as ``plan_backends``: what a fleet device takes from a release that
    carries several formats of one model.
    """
    o = _options(s)
    wanted = getattr(s, "backend", "auto")
    if wanted != "auto":
        spec = BACKENDS[wanted]
        return [] if spec.missing(o) else list(spec.formats)
    order: list[str] = []
    usable = {k: BACKENDS[k].missing(o) is None for k in BACKENDS}
    if o.delegate and usable["litert"]:
        order.append("tflite")
    if usable["tensorrt"]:
        order += ["engine", "onnx"]
    if usable["onnxruntime"] and _onnxruntime_gpu(o):
        order.append("onnx")
    if usable["litert"]:
        order.append("tflite")
    if usable["onnxruntime"]:
        order.append("onnx")
    return list(dict.fromkeys(order))


def backend_entry(cls: type[Backend]) -> ScorerEntry:
    """A registry entry that runs a model file with ``cls`` alone and scores its output."""
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
    "tflite": _model_entry(),
    "onnx": _model_entry(),
    "engine": _model_entry(),
    WindowedGaussianDetector.KEY: online_entry(WindowedGaussianDetector),
    ArtimeDetector.KEY: online_entry(ArtimeDetector),
    KnnDetector.KEY: online_entry(KnnDetector),
    GaussianDetector.KEY: ScorerEntry(_gaussian, False),
    HalfSpaceDetector.KEY: ScorerEntry(_hst, False),
    PcaDetector.KEY: ScorerEntry(lambda card, s: PcaDetector(
        n_fields=len(s.fields), window=s.window, hop=s.hop,
        halflife=s.adapt.pca_halflife, slow=s.adapt.pca_slow), False),
}


def open_scorer(card: ModelCard, s: StreamConfig, state_dir: Path | None = None) -> Scorer:
    """A scorer for ``card`` on stream ``s``; whatever goes wrong becomes a ModelError.

    ``state_dir`` is where a backend may cache what it builds (TensorRT engines).
    """
    entry = SCORERS.get(card.format)
    if entry is None:
        raise ModelError(f"{card.name}: format {card.format!r} has no backend here "
                         f"(known: {', '.join(SCORERS)})")
    try:
        if entry.open_model is not None:
            return entry.open_model(card, s, state_dir)
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
    state_dir = cfg.resolve(cfg.state_dir)
    if cfg.fleet.enabled:
        # Imported only when fleet delivery is on: it pulls in cryptography (~10 MB RSS).
        from agent.fleet.manager import stored_card_for  # noqa: PLC0415

        delivered = stored_card_for(cfg, card)
        if delivered is not card:
            try:
                return _check_fit(delivered, s), open_scorer(delivered, s, state_dir)
            except ModelError as e:
                log.error("delivered model %s v%d unusable here, using the configured one: %s",
                          delivered.name, delivered.version, e)
    return _check_fit(card, s), open_scorer(card, s, state_dir)
