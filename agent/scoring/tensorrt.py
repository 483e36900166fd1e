"""TensorRT backend: an ONNX model built to an engine on this GPU, or a prebuilt engine.

``format: onnx`` is parsed with TensorRT's ONNX parser and built (``fp32``, ``fp16``, or
``int8`` for a Q/DQ-quantised ONNX) with one optimisation profile for batches 1..max_batch.
The serialised engine is cached under the engine cache directory (``<state_dir>/engines``
by default) next to a JSON record of what it was built for: the model's sha256, the GPU
(name, compute capability), the TensorRT version, the precision and max_batch. A cached
engine whose record differs (another GPU, a TensorRT upgrade, a copied state dir) is refused
with a warning and rebuilt; so is one TensorRT itself cannot deserialise.
``format: engine`` is a prebuilt engine: loaded as is, refused if TensorRT cannot load it.

Imports are guarded: without ``tensorrt`` (and ``cuda-python`` for device memory) this
backend is simply unavailable. NOT verified on this project's CI machines (no GPU there):
``scripts/check_tensorrt.sh`` runs its tests and a benchmark on a CUDA machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from agent.scoring.backend import Backend, BackendUnavailable

__all__ = ["EngineCache", "EngineIdentity", "TensorRTBackend", "tensorrt_usable"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EngineIdentity:
    """Everything a serialised engine depends on; a cached engine must match all of it."""

    model_sha256: str
    gpu: str  # device name
    compute_capability: str  # "8.7" (Orin), "9.0" (H100/H200)
    tensorrt: str  # tensorrt.__version__
    precision: str
    max_batch: int

    @property
    def key(self) -> str:
        """The cache key: a hash of every field."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class EngineCache:
    """One engine file per model, precision and max_batch; its identity in a JSON record."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _paths(self, ident: EngineIdentity) -> tuple[Path, Path]:
        stem = f"{ident.model_sha256[:16]}-{ident.precision}-b{ident.max_batch}"
        return self.root / f"{stem}.engine", self.root / f"{stem}.json"

    def load(self, ident: EngineIdentity) -> bytes | None:
        """The cached engine for ``ident``, or None (absent, or built for something else)."""
        engine, record = self._paths(ident)
        if not engine.is_file():
            return None
        try:
            built_for = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            built_for = None
        recorded = ({k: v for k, v in built_for.items() if k != "engine_sha256"}
                    if isinstance(built_for, dict) else None)
        if recorded != {**asdict(ident), "key": ident.key}:
            theirs = (f"{built_for.get('gpu')} (sm {built_for.get('compute_capability')}), "
                      f"TensorRT {built_for.get('tensorrt')}" if isinstance(built_for, dict)
                      else "no readable record")
            log.warning("refusing cached TensorRT engine %s: built for %s, this is %s (sm %s), "
                        "TensorRT %s; rebuilding", engine.name, theirs, ident.gpu,
                        ident.compute_capability, ident.tensorrt)
            return None
        data = engine.read_bytes()
        if hashlib.sha256(data).hexdigest() != built_for.get("engine_sha256"):
            log.warning("refusing cached TensorRT engine %s: its bytes changed; rebuilding",
                        engine.name)
            return None
        return data

    def store(self, ident: EngineIdentity, data: bytes) -> Path:
        """Write the engine and its record atomically (a crash leaves the old pair or none)."""
        self.root.mkdir(parents=True, exist_ok=True)
        engine, record = self._paths(ident)
        rec = {**asdict(ident), "key": ident.key,
               "engine_sha256": hashlib.sha256(data).hexdigest()}
        for path, blob in ((engine, data), (record, json.dumps(rec, indent=1).encode())):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return engine


class Runtime(Protocol):
    """What the backend needs from TensorRT + CUDA (a fake in the tests: no GPU there)."""

    version: str

    def gpu(self) -> tuple[str, str]:
        """(device name, compute capability) of the current CUDA device."""

    def build(self, onnx: bytes, precision: str, max_batch: int, workspace: int) -> bytes:
        """A serialised engine for the ONNX model; ValueError if it cannot be built."""

    def load(self, engine: bytes, max_batch: int) -> Any:
        """A runner (``input_shape``, ``output_shape``, ``run(x) -> y``), or None if refused."""


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime  # noqa: PLC0415  (cuda-python >= 12.6)
    except ImportError:
        try:
            from cuda import cudart as runtime  # noqa: PLC0415
        except ImportError:
            raise BackendUnavailable("the tensorrt backend needs cuda-python "
                                     "(pip install cuda-python)") from None
    return runtime


def _check(result: Any) -> Any:
    """cuda-python returns (error, *values); raise on an error, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


class _TrtRunner:
    """One engine, one execution context, device buffers for max_batch, one CUDA stream."""

    def __init__(self, trt: Any, cudart: Any, engine: Any, max_batch: int) -> None:
        self._cudart = cudart
        self._engine = engine
        self._ctx = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise ValueError(f"expected 1 input and 1 output, got {len(ins)} and {len(outs)}")
        self._in, self._out = ins[0], outs[0]
        for n in (self._in, self._out):
            if trt.nptype(engine.get_tensor_dtype(n)) != np.float32:
                raise ValueError(f"tensor {n!r} is not float32")
        self.input_shape = tuple(int(d) for d in engine.get_tensor_shape(self._in)[1:])
        self.output_shape = tuple(int(d) for d in engine.get_tensor_shape(self._out)[1:])
        self._max = max_batch
        self._in_bytes = 4 * int(np.prod(self.input_shape))
        self._out_bytes = 4 * int(np.prod(self.output_shape))
        self._d_in = _check(cudart.cudaMalloc(self._in_bytes * max_batch))
        self._d_out = _check(cudart.cudaMalloc(self._out_bytes * max_batch))
        self._stream = _check(cudart.cudaStreamCreate())
        self._ctx.set_tensor_address(self._in, int(self._d_in))
        self._ctx.set_tensor_address(self._out, int(self._d_out))
        self._h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        n = x.shape[0]
        cu = self._cudart
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((n, *self.output_shape), np.float32)
        self._ctx.set_input_shape(self._in, (n, *self.input_shape))
        _check(cu.cudaMemcpyAsync(self._d_in, x.ctypes.data, n * self._in_bytes, self._h2d,
                                  self._stream))
        if not self._ctx.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(cu.cudaMemcpyAsync(y.ctypes.data, self._d_out, n * self._out_bytes, self._d2h,
                                  self._stream))
        _check(cu.cudaStreamSynchronize(self._stream))
        return y

    def __del__(self) -> None:
        cu = getattr(self, "_cudart", None)
        if cu is None:
            return
        for ptr in (getattr(self, "_d_in", None), getattr(self, "_d_out", None)):
            if ptr is not None:
                cu.cudaFree(ptr)
        if getattr(self, "_stream", None) is not None:
            cu.cudaStreamDestroy(self._stream)


class TensorRTRuntime:
    """The real thing: ``tensorrt`` + ``cuda-python`` on a CUDA device."""

    def __init__(self) -> None:
        try:
            import tensorrt as trt  # noqa: PLC0415
        except ImportError:
            raise BackendUnavailable("the tensorrt backend needs TensorRT's Python package "
                                     "(JetPack ships it; pip install tensorrt elsewhere)"
                                     ) from None
        self._trt = trt
        self._cudart = _cudart()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.version = str(trt.__version__)

    def gpu(self) -> tuple[str, str]:
        cu = self._cudart
        dev = _check(cu.cudaGetDevice())
        props = _check(cu.cudaGetDeviceProperties(dev))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) \
            else str(props.name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"

    def build(self, onnx: bytes, precision: str, max_batch: int, workspace: int) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT's ONNX parser refused the model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            quantised = any(network.get_layer(i).type == trt.LayerType.QUANTIZE
                            for i in range(network.num_layers))
            if not quantised:
                raise ValueError("precision int8 needs a Q/DQ-quantised ONNX model (no "
                                 "calibrator here); this one is float: use fp16 or fp32")
            config.set_flag(trt.BuilderFlag.INT8)
        inp = network.get_input(0)
        dims = tuple(inp.shape)[1:]
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, *dims), (max_batch, *dims), (max_batch, *dims))
        config.add_optimization_profile(profile)
        serialised = builder.build_serialized_network(network, config)
        if serialised is None:
            raise ValueError("TensorRT could not build an engine (see its log above)")
        return bytes(serialised)

    def load(self, engine: bytes, max_batch: int) -> Any:
        runtime = self._trt.Runtime(self._logger)
        eng = runtime.deserialize_cuda_engine(engine)
        if eng is None:
            return None
        return _TrtRunner(self._trt, self._cudart, eng, max_batch)


def tensorrt_usable() -> str | None:
    """None when TensorRT and a GPU are here, else why not (cheap: no CUDA context)."""
    import importlib.util  # noqa: PLC0415

    from agent.scoring.onnx import nvidia_gpu_present  # noqa: PLC0415

    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if not nvidia_gpu_present():
        return "no NVIDIA GPU device node (/dev/nvidia0, /dev/nvhost-ctrl-gpu)"
    return None


class TensorRTBackend(Backend):
    KEY: ClassVar[str] = "tensorrt"

    def __init__(self, path: Path, max_batch: int, *, precision: str = "fp16",
                 cache_dir: Path | None = None, workspace_mb: int = 256,
                 fmt: str = "onnx", runtime: Runtime | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        rt = runtime if runtime is not None else TensorRTRuntime()
        self.max_batch = max_batch
        self.engine_path: Path | None = None
        self.built = False
        data = path.read_bytes()
        if fmt == "engine":
            runner = rt.load(data, max_batch)
            if runner is None:
                raise ValueError(f"{path}: TensorRT {rt.version} cannot load this engine "
                                 f"(built for another GPU or TensorRT version?)")
        else:
            gpu, cc = rt.gpu()
            ident = EngineIdentity(hashlib.sha256(data).hexdigest(), gpu, cc, rt.version,
                                   precision, max_batch)
            cache = EngineCache(cache_dir) if cache_dir is not None else None
            engine = cache.load(ident) if cache is not None else None
            runner = rt.load(engine, max_batch) if engine is not None else None
            if engine is not None and runner is None:
                log.warning("TensorRT %s refused its cached engine for %s; rebuilding",
                            rt.version, path.name)
            if runner is None:
                log.info("building a TensorRT %s engine for %s on %s (%s, batch <= %d)",
                         precision, path.name, gpu, rt.version, max_batch)
                engine = rt.build(data, precision, max_batch, workspace_mb << 20)
                self.built = True
                if cache is not None:
                    self.engine_path = cache.store(ident, engine)
                runner = rt.load(engine, max_batch)
                if runner is None:
                    raise ValueError(f"{path}: TensorRT cannot load the engine it just built")
            elif cache is not None:
                self.engine_path = cache._paths(ident)[0]
            self.identity = ident
        self._runner = runner
        self._in_shape = tuple(runner.input_shape)
        self._out_shape = tuple(runner.output_shape)

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.check_batch(batch)
        out = self._runner.run(batch)
        return np.asarray(out, dtype=np.float32)
