#!/usr/bin/env bash
# The TensorRT checks this project's CI cannot run (no GPU there): on a CUDA machine
# (a Jetson with JetPack, or an x86 box with an NVIDIA GPU), with tensorrt and cuda-python
# importable in the venv:
#   VENV=.venv ./scripts/check_tensorrt.sh
# Runs the TensorRT tests for real (tests/test_backends.py -k tensorrt: the real build,
# cache and numbers against onnxruntime, plus the fake-runtime ones), then the backend
# benchmark, which then includes the tensorrt row.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
"$PY" - <<'PY'
import sys
from agent.scoring.tensorrt import tensorrt_usable
why = tensorrt_usable()
if why:
    sys.exit(f"check_tensorrt: cannot run here: {why} (pip install 'edge-agent[tensorrt]' on "
             f"a CUDA machine; JetPack ships tensorrt)")
from agent.scoring.tensorrt import TensorRTRuntime
rt = TensorRTRuntime()
print("TensorRT", rt.version, "on", *rt.gpu())
PY
"$PY" -m pytest -q -rs tests/test_backends.py -k "tensorrt or onnx" -p no:cacheprovider
"$PY" scripts/bench_backends.py --seconds 3
