"""LiteRT (TFLite) backend: int8 or float32 ``.tflite`` models on the CPU.

Input and output quantisation are read from the model's tensor details; the
backend quantises whole batches with numpy (per window it would cost ~19 us of
numpy overhead, more than the model itself, see PERFORMANCE.md).

External delegates (``delegate: edgetpu`` or a path to a delegate ``.so``) are loaded with
LiteRT's ``load_delegate`` and handed to the interpreter; a delegate that does not load
raises ``DelegateError`` (the stream refuses to start, or ``backend: auto`` falls back to
plain LiteRT with a warning). An Edge TPU only runs a model compiled by
``edgetpu_compiler``; other ops stay on the CPU.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from agent.scoring.backend import Backend, BackendUnavailable

__all__ = ["EDGETPU_LIBRARY", "DelegateError", "LiteRTBackend", "delegate_library"]

# The Edge TPU runtime's shared library (libedgetpu1-std / -max from Coral's apt repository).
EDGETPU_LIBRARY = "libedgetpu.so.1"


class DelegateError(ValueError):
    """An external delegate that could not be loaded or applied."""


def delegate_library(delegate: str) -> str:
    """``edgetpu`` -> the Edge TPU library; anything else is a path to a delegate .so."""
    return EDGETPU_LIBRARY if delegate == "edgetpu" else delegate


def _load_delegate(library: str, options: dict[str, str]) -> Any:
    try:
        from ai_edge_litert.interpreter import load_delegate  # noqa: PLC0415
    except ImportError:
        try:
            from tflite_runtime.interpreter import load_delegate  # noqa: PLC0415
        except ImportError:
            raise BackendUnavailable("the litert backend needs ai-edge-litert") from None
    # Open the library first: LiteRT's own failure path leaves a noisy half-built Delegate.
    try:
        lib = ctypes.CDLL(library)
    except OSError as e:
        raise DelegateError(f"delegate {library!r} did not load: {e}") from e
    if not hasattr(lib, "tflite_plugin_create_delegate"):
        raise DelegateError(f"{library!r} is not a LiteRT external delegate (it has no "
                            f"tflite_plugin_create_delegate)")
    try:
        return load_delegate(library, options or None)
    except (ValueError, OSError, RuntimeError, AttributeError) as e:
        raise DelegateError(f"delegate {library!r} did not load: {e}") from e


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # noqa: PLC0415

        return Interpreter
    except ImportError:
        raise BackendUnavailable(
            "the litert backend needs ai-edge-litert (pip install ai-edge-litert) "
            "or tflite-runtime"
        ) from None


class LiteRTBackend(Backend):
    KEY: ClassVar[str] = "tflite"

    def __init__(self, path: Path, max_batch: int, num_threads: int = 1, *,
                 delegate: str = "", delegate_options: dict[str, str] | None = None) -> None:
        interpreter_cls = _interpreter_class()
        delegates = []
        self.delegate = delegate
        if delegate:
            delegates.append(_load_delegate(delegate_library(delegate), delegate_options or {}))
        try:
            self._interp = interpreter_cls(model_path=str(path), num_threads=num_threads,
                                           experimental_delegates=delegates or None)
        except (ValueError, RuntimeError) as e:
            if delegates:
                raise DelegateError(f"{path}: delegate {delegate!r} could not be applied: "
                                    f"{e}") from e
            raise ValueError(f"{path}: not a loadable TFLite model: {e}") from e
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{path}: expected 1 input and 1 output tensor, got "
                             f"{len(inputs)} and {len(outputs)}")
        self._in, self._out = inputs[0], outputs[0]
        self._in_shape = tuple(int(d) for d in self._in["shape"][1:])
        self._out_shape = tuple(int(d) for d in self._out["shape"][1:])
        self._in_dtype = np.dtype(self._in["dtype"])
        self._out_dtype = np.dtype(self._out["dtype"])
        self._in_q = self._quant(self._in)
        self._out_q = self._quant(self._out)
        self.max_batch = max_batch
        # One fixed batch size: a resize costs an allocate_tensors, padding costs
        # a few microseconds of int8 arithmetic.
        self._interp.resize_tensor_input(self._in["index"], [max_batch, *self._in_shape])
        self._interp.allocate_tensors()
        self._in_buf = np.zeros((max_batch, *self._in_shape), dtype=self._in_dtype)
        self._scratch = np.zeros((max_batch, *self._in_shape), dtype=np.float32)
        # The clamp bounds as whole float32 batches: np.minimum/maximum against an array
        # of the same shape run numpy's vectorised loop, against a scalar a plain one
        # (3x slower for a batch of 32 windows of 128 values); the same values either way.
        # They are the quantised input type's range (unused for a float input).
        info = np.iinfo(self._in_dtype) if self._in_q is not None else None
        self._lo = np.full_like(self._scratch, info.min if info is not None else 0)
        self._hi = np.full_like(self._scratch, info.max if info is not None else 0)
        # Scales and zero points as float32 0-d arrays: the float32 values numpy makes of
        # the Python numbers, without converting them on every call.
        self._in_f32 = tuple(np.array(v, np.float32) for v in self._in_q or (1.0, 0))
        self._out_f32 = tuple(np.array(v, np.float32) for v in self._out_q or (1.0, 0))

    @staticmethod
    def _quant(detail: dict[str, Any]) -> tuple[float, int] | None:
        if np.dtype(detail["dtype"]) not in (np.int8, np.uint8):
            return None
        scale, zero = detail["quantization"]
        if scale == 0:
            raise ValueError(f"tensor {detail['name']!r} is integer but has no quantisation scale")
        return float(scale), int(zero)

    @property
    def quantization(self) -> dict[str, tuple[float, int] | None]:
        return {"input": self._in_q, "output": self._out_q}

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        n = self.check_batch(batch)
        if self._in_q is None:
            self._in_buf[:n] = batch
        else:
            scale, zero = self._in_f32
            s = self._scratch[:n]
            # (a float64 batch is divided by the Python number, in float64, as before)
            np.divide(batch, scale if batch.dtype == np.float32 else self._in_q[0], out=s)
            np.rint(s, out=s)
            s += zero
            # np.minimum/maximum: np.clip's Python wrapper costs more than the work.
            np.maximum(np.minimum(s, self._hi[:n], out=s), self._lo[:n], out=s)
            self._in_buf[:n] = s
        if n < self.max_batch:
            self._in_buf[n:] = 0
        self._interp.set_tensor(self._in["index"], self._in_buf)
        self._interp.invoke()
        out = self._interp.get_tensor(self._out["index"])[:n]
        if self._out_q is None:
            return np.asarray(out, dtype=np.float32)
        scale, zero = self._out_f32
        result: npt.NDArray[np.float32] = out.astype(np.float32)
        result -= zero  # in place: the same arithmetic, no temporaries
        result *= scale
        return result
