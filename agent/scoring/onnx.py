"""ONNX Runtime backend: float32 (or QDQ-quantised) ``.onnx`` models.

Runs on the CPU execution provider everywhere; takes the TensorRT and CUDA execution
providers first when the installed onnxruntime has them (``onnxruntime-gpu``, or the
Jetson wheels) and an NVIDIA device is present. ``providers`` overrides the order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from agent.scoring.backend import Backend, BackendUnavailable

__all__ = ["GPU_PROVIDERS", "OnnxRuntimeBackend", "available_providers", "nvidia_gpu_present"]

# Preferred first; the CPU provider is always last.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


def _ort() -> Any:
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError:
        raise BackendUnavailable(
            "the onnxruntime backend needs onnxruntime (pip install 'edge-agent[onnx]', or "
            "onnxruntime-gpu / NVIDIA's Jetson wheel for the GPU providers)") from None
    return onnxruntime


def nvidia_gpu_present() -> bool:
    """An NVIDIA GPU's device node: desktop/server (/dev/nvidia0) or Jetson (/dev/nvhost-*)."""
    dev = Path("/dev")
    return (dev / "nvidia0").exists() or (dev / "nvhost-ctrl-gpu").exists()


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build has ([] if it is not installed)."""
    try:
        return list(_ort().get_available_providers())
    except BackendUnavailable:
        return []


def default_providers(available: Sequence[str], gpu: bool) -> list[str]:
    """GPU providers first when a GPU is there, then the CPU provider."""
    chosen = [p for p in GPU_PROVIDERS if p in available] if gpu else []
    return [*chosen, CPU_PROVIDER]


class OnnxRuntimeBackend(Backend):
    KEY: ClassVar[str] = "onnxruntime"

    def __init__(self, path: Path, max_batch: int, *, threads: int = 1,
                 providers: Sequence[str] = (), trt_cache_dir: Path | None = None,
                 fp16: bool = False) -> None:
        ort = _ort()
        available = list(ort.get_available_providers())
        if providers:
            missing = [p for p in providers if p not in available]
            if missing:
                raise ValueError(f"execution provider(s) {', '.join(missing)} not in this "
                                 f"onnxruntime build (it has {', '.join(available)})")
            wanted = list(providers)
        else:
            wanted = default_providers(available, nvidia_gpu_present())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: the agent logs what matters
        plist: list[str | tuple[str, dict[str, Any]]] = []
        for p in wanted:
            if p == "TensorrtExecutionProvider":
                trt_opts: dict[str, Any] = {"trt_fp16_enable": fp16,
                                            "trt_max_workspace_size": 256 << 20}
                if trt_cache_dir is not None:
                    trt_cache_dir.mkdir(parents=True, exist_ok=True)
                    trt_opts.update(trt_engine_cache_enable=True,
                                    trt_engine_cache_path=str(trt_cache_dir))
                plist.append((p, trt_opts))
            else:
                plist.append(p)
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=plist)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: not a loadable ONNX model: {e}") from e
        self.providers = list(self._sess.get_providers())
        inputs, outputs = self._sess.get_inputs(), self._sess.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{path}: expected 1 input and 1 output, got {len(inputs)} and "
                             f"{len(outputs)}")
        if inputs[0].type != "tensor(float)" or outputs[0].type != "tensor(float)":
            raise ValueError(f"{path}: expected float32 input and output, got "
                             f"{inputs[0].type} and {outputs[0].type}")
        self._in_name, self._out_name = inputs[0].name, outputs[0].name
        self._in_shape = self._fixed(inputs[0].shape, path, "input")
        self._out_shape = self._fixed(outputs[0].shape, path, "output")
        self.max_batch = max_batch

    @staticmethod
    def _fixed(shape: Sequence[Any], path: Path, what: str) -> tuple[int, ...]:
        dims = list(shape)[1:]
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ValueError(f"{path}: {what} shape {list(shape)} must be fixed past the batch "
                             f"dimension")
        return tuple(int(d) for d in dims)

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.check_batch(batch)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out = self._sess.run([self._out_name], {self._in_name: x})[0]
        return np.asarray(out, dtype=np.float32)
