#!/usr/bin/env python3
"""Train and export the reference SKAB dense autoencoder (``models/skab-ae``).

Only the SKAB *anomaly-free* recording is used, both for fitting and for every choice made
here (normalisation, architecture, epochs, validation split). The valve1 recordings are
deliberately never read: they are held out for evaluating the agent.

Pipeline:

1. read ``anomaly-free.csv`` (``;``-separated, ``datetime`` then 8 channels at 1 Hz);
2. split the rows in time order, 90 % train / 10 % validation;
3. condition the windows as the agent does on a device (``agent.pipeline.features.Scaling``):
   Temperature and Thermocouple de-levelled per window (``diff``), every channel scaled by
   median / robust spread fitted on a 400-row warm-up. To cover what a device sees after its
   warm-up, a warm-up starts every ``--segment-step`` rows and its scaling conditions the
   windows of the next ``--horizon`` rows (hop ``--train-hop``);
4. windows of 16 samples, flattened time-major (index = t * 8 + channel);
5. fit a 128 -> 32 -> 8 -> 32 -> 128 dense autoencoder (MSE, Adam);
6. convert to a full-integer (int8 in / int8 out) TFLite model with a resizable batch dim;
7. run the int8 model in ai-edge-litert on the validation windows exactly as the agent does
   (quantise with the input tensor's scale/zero point, clip to int8, dequantise the output,
   score = mean squared reconstruction error per window) and write ``model.json`` + the model;
8. export the same trained (float) Keras model to ONNX (``model.onnx``, float32 in/out, batch
   dimension named ``batch``) for the ONNX Runtime and TensorRT backends, run it in
   onnxruntime on the validation windows and record in the card how far its scores are from
   the int8 model's (the ``variants`` entry). Both files always come from one run, so a
   retrain regenerates them together (tests/test_backends.py checks they agree).

Run from the repository root, in the training venv (TensorFlow is never needed at run time)::

    .venv-train/bin/python scripts/train_model.py --out models/skab-ae
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

# The ONNX export needs onnx (and keras' exporter, tf2onnx); onnxruntime checks the result.
# All three are in the train extra: pip install .[train]

FloatArray = npt.NDArray[np.float32]

REPO_ROOT = Path(__file__).resolve().parent.parent



# The agent's own scaling, so training conditions windows exactly as a device does
# (the training venv needs numpy and pyyaml besides TensorFlow).
sys.path.insert(0, str(REPO_ROOT))
from agent.pipeline.features import Scaling  # noqa: E402


def device_scaling(window: int, warmup_rows: FloatArray) -> Scaling:
    """The stream's ``normalise: warmup`` scaling, fitted on one simulated warm-up."""
    c = warmup_rows.shape[1]
    s = Scaling("warmup", np.zeros(c, np.float32), np.ones(c, np.float32), window=window,
                transforms=TRANSFORMS)
    s.learn(warmup_rows.astype(np.float32))
    s.freeze()
    return s
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data" / "skab" / "anomaly-free" / "anomaly-free.csv"
DEFAULT_OUT = REPO_ROOT / "models" / "skab-ae"

FIELDS: list[str] = [
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
]
N_CHANNELS = len(FIELDS)
# Per field, the agent's per-window transform (the slow thermal channels are de-levelled).
TRANSFORMS = ["level", "level", "level", "level", "diff", "diff", "level", "level"]
WARMUP = 400
MODEL_NAME = "skab-ae"
MODEL_VERSION = 1  # fleet tests push v2 of the shipped model; bump with them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SKAB anomaly-free.csv")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=16, help="samples per window")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--segment-step", type=int, default=200, help="rows between simulated warm-ups")
    p.add_argument("--horizon", type=int, default=0,
                   help="rows after each simulated warm-up conditioned with its scaling")
    p.add_argument("--train-hop", type=int, default=2, help="hop of the training windows")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=32, help="width of the outer hidden layers")
    p.add_argument("--bottleneck", type=int, default=8, help="width of the code layer")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of rows held out")
    p.add_argument(
        "--rep-samples", type=int, default=1000, help="training windows used for calibration"
    )
    p.add_argument(
        "--rep-range",
        type=float,
        default=6.0,
        help="also calibrate on 2x-scaled windows clipped to +/- this many std, so anomalous "
        "inputs up to that level are not all saturated by the int8 input quantisation",
    )
    p.add_argument(
        "--check-determinism",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train + convert a second time in-process and record whether the bytes match",
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


def load_csv(path: Path) -> tuple[FloatArray, list[str]]:
    """Return (rows x 8 float32 array in FIELDS order, timestamps)."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh, delimiter=";")
        header = next(reader)
        if header[0] != "datetime":
            raise ValueError(f"{path}: first column is {header[0]!r}, expected 'datetime'")
        missing = [f for f in FIELDS if f not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        cols = [header.index(f) for f in FIELDS]
        stamps: list[str] = []
        values: list[list[float]] = []
        for row in reader:
            if not row:
                continue
            stamps.append(row[0])
            values.append([float(row[c]) for c in cols])
    data = np.asarray(values, dtype=np.float64)
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: non-finite values")
    return data.astype(np.float32), stamps


def device_windows(rows: FloatArray, args: argparse.Namespace) -> FloatArray:
    """Flattened windows conditioned as a device would: warm-up fits every segment-step rows."""
    out = []
    for start in range(0, max(1, rows.shape[0] - WARMUP - args.window + 1), args.segment_step):
        scaler = device_scaling(args.window, rows[start : start + WARMUP])
        seg = rows[start : start + WARMUP + args.horizon]
        w = make_windows(seg, args.window)[:: args.train_hop].reshape(-1, args.window, N_CHANNELS)
        w = np.ascontiguousarray(w, dtype=np.float32)
        scaler.apply(w)
        out.append(w.reshape(w.shape[0], -1))
    return np.concatenate(out)


def make_windows(x: FloatArray, window: int) -> FloatArray:
    """(T, C) -> (T - window + 1, window * C), hop 1, time-major: index = t * C + c."""
    n = x.shape[0] - window + 1
    if n <= 0:
        raise ValueError(f"need at least {window} rows, got {x.shape[0]}")
    idx = np.arange(window)[None, :] + np.arange(n)[:, None]
    return np.ascontiguousarray(x[idx].reshape(n, window * x.shape[1]), dtype=np.float32)


# --------------------------------------------------------------------------- model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # keras / legacy code paths may use the global RNG
    tf.keras.utils.set_random_seed(seed)


def build_model(n_in: int, hidden: int, bottleneck: int) -> Any:
    inputs = tf.keras.Input(shape=(n_in,), name="window")
    h = tf.keras.layers.Dense(hidden, activation="relu", name="enc1")(inputs)
    code = tf.keras.layers.Dense(bottleneck, activation="linear", name="code")(h)
    h = tf.keras.layers.Dense(hidden, activation="relu", name="dec1")(code)
    outputs = tf.keras.layers.Dense(n_in, activation="linear", name="reconstruction")(h)
    return tf.keras.Model(inputs, outputs, name=MODEL_NAME)


def train(
    x_train: FloatArray, x_val: FloatArray, args: argparse.Namespace
) -> tuple[Any, list[float], list[float]]:
    seed_everything(args.seed)
    model = build_model(x_train.shape[1], args.hidden, args.bottleneck)
    model.compile(optimizer=tf.keras.optimizers.Adam(args.learning_rate), loss="mse")
    hist = model.fit(
        x_train,
        x_train,
        validation_data=(x_val, x_val),
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=True,
        verbose=0,
    )
    return (
        model,
        [float(v) for v in hist.history["loss"]],
        [float(v) for v in hist.history["val_loss"]],
    )


def representative_windows(x_train: FloatArray, args: argparse.Namespace) -> FloatArray:
    """Evenly spaced training windows plus 2x-scaled copies clipped to +/- rep_range."""
    n = min(args.rep_samples, x_train.shape[0])
    pick = np.linspace(0, x_train.shape[0] - 1, n).round().astype(np.int64)
    base = x_train[pick]
    scaled = np.clip(base[::4] * 2.0, -args.rep_range, args.rep_range)
    return np.concatenate([base, scaled]).astype(np.float32)


def convert(model: Any, rep: FloatArray) -> bytes:
    def rep_gen() -> Iterator[list[FloatArray]]:
        for row in rep:
            yield [row[None, :]]

    # The Keras Input has shape (None, 128), so the converted model keeps a resizable batch dim.
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = rep_gen
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


# --------------------------------------------------------------------------- int8 evaluation


def make_interpreter(model_bytes: bytes) -> Any:
    return Interpreter(model_content=model_bytes)


def quant_params(detail: dict[str, Any]) -> tuple[float, int]:
    """Per-tensor (scale, zero_point) read back from the converted model."""
    qp = detail["quantization_parameters"]
    scales, zps = qp["scales"], qp["zero_points"]
    if len(scales) != 1 or len(zps) != 1:
        raise ValueError(f"{detail['name']}: expected per-tensor quantisation, got {qp}")
    scale, zp = float(scales[0]), int(zps[0])
    if (scale, zp) != (float(detail["quantization"][0]), int(detail["quantization"][1])):
        raise ValueError(f"{detail['name']}: inconsistent quantisation fields")
    return scale, zp


def run_int8(interp: Any, x: FloatArray, batch: int) -> FloatArray:
    """Agent-equivalent inference: quantise, clip, invoke, dequantise. Returns float32 output."""
    inp = interp.get_input_details()[0]
    in_scale, in_zp = quant_params(inp)
    out_chunks: list[FloatArray] = []
    current = -1
    for start in range(0, x.shape[0], batch):
        chunk = x[start : start + batch]
        if chunk.shape[0] != current:
            interp.resize_tensor_input(inp["index"], [chunk.shape[0], x.shape[1]])
            interp.allocate_tensors()
            current = chunk.shape[0]
        inp = interp.get_input_details()[0]
        out = interp.get_output_details()[0]
        q = np.clip(np.round(chunk / in_scale) + in_zp, -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], q)
        interp.invoke()
        out_scale, out_zp = quant_params(out)
        y = interp.get_tensor(out["index"]).astype(np.float32)
        out_chunks.append(((y - out_zp) * out_scale).astype(np.float32))
    return np.concatenate(out_chunks)


def scores(recon: FloatArray, x: FloatArray) -> FloatArray:
    err = np.square(recon.astype(np.float64) - x.astype(np.float64))
    return np.asarray(err.mean(axis=1), dtype=np.float32)


def quantiles(s: FloatArray) -> dict[str, float]:
    qs = {"p50": 50.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}
    out = {k: round(float(np.percentile(s, q)), 6) for k, q in qs.items()}
    out["max"] = round(float(s.max()), 6)
    return out


def rank(a: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    r = np.empty(a.shape[0], dtype=np.float64)
    r[np.argsort(a, kind="stable")] = np.arange(a.shape[0], dtype=np.float64)
    return r


def check_batches(model_bytes: bytes, x: FloatArray) -> float:
    """Batch 1 and batch 64 must both run and agree; returns their max abs difference."""
    a = run_int8(make_interpreter(model_bytes), x[:64], batch=1)
    b = run_int8(make_interpreter(model_bytes), x[:64], batch=64)
    if a.shape != (64, x.shape[1]) or b.shape != a.shape:
        raise RuntimeError(f"unexpected output shapes {a.shape} / {b.shape}")
    return float(np.abs(a - b).max())


# --------------------------------------------------------------------------- ONNX export

ONNX_OPSET = 17
# |onnx score - int8 score| <= ONNX_ABS_TOL + ONNX_REL_TOL * int8 score on real windows inside
# the int8 input range: the float export does not round weights or activations to int8, so
# it differs from the int8 model by the quantisation error (score_abs_diff_max in the metrics).
ONNX_ABS_TOL = 0.03
ONNX_REL_TOL = 0.05


def export_onnx(model: Any, in_range: tuple[float, float], out_range: tuple[float, float]) -> bytes:
    """The float Keras model as ONNX: input ``window``, output ``reconstruction``, dim ``batch``.

    The int8 model saturates its input and output at the int8 tensors' representable ranges;
    the export clips to the same ranges (two Clip nodes), so it is the same function on
    windows far outside the training data. Names and metadata are fixed so the same weights
    give the same bytes.
    """
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        model.export(str(path), format="onnx", verbose=False, opset_version=ONNX_OPSET)
        proto = onnx.load(str(path))
    g = proto.graph
    src_in, src_out = g.input[0].name, g.output[0].name
    for node in g.node:
        node.input[:] = ["window_clipped" if n == src_in else n for n in node.input]
        node.output[:] = ["reconstruction_raw" if n == src_out else n for n in node.output]
    g.initializer.extend([
        helper.make_tensor("in_min", TensorProto.FLOAT, [], [in_range[0]]),
        helper.make_tensor("in_max", TensorProto.FLOAT, [], [in_range[1]]),
        helper.make_tensor("out_min", TensorProto.FLOAT, [], [out_range[0]]),
        helper.make_tensor("out_max", TensorProto.FLOAT, [], [out_range[1]]),
    ])
    nodes = list(g.node)
    del g.node[:]
    g.node.extend([
        helper.make_node("Clip", ["window", "in_min", "in_max"], ["window_clipped"],
                         name="int8_input_range"),
        *nodes,
        helper.make_node("Clip", ["reconstruction_raw", "out_min", "out_max"],
                         ["reconstruction"], name="int8_output_range"),
    ])
    g.input[0].name, g.output[0].name = "window", "reconstruction"
    for value in (g.input[0], g.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    g.name = MODEL_NAME
    proto.producer_name = "edge-agent scripts/train_model.py"
    proto.producer_version = ""
    proto.doc_string = ""
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())


def run_onnx(model_bytes: bytes, x: FloatArray) -> FloatArray:
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"window": x})[0], dtype=np.float32)


# --------------------------------------------------------------------------- main


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def fit_and_convert(
    x_train: FloatArray, x_val: FloatArray, args: argparse.Namespace
) -> tuple[Any, list[float], list[float], bytes]:
    model, loss, val_loss = train(x_train, x_val, args)
    model_bytes = convert(model, representative_windows(x_train, args))
    return model, loss, val_loss, model_bytes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    t0 = time.monotonic()

    data_path: Path = args.data.resolve()
    raw, stamps = load_csv(data_path)
    n_rows = raw.shape[0]
    split = round(n_rows * (1.0 - args.val_fraction))
    train_rows, val_rows = raw[:split], raw[split:]

    x_train = device_windows(train_rows, args)
    x_val = device_windows(val_rows, args)
    print(f"rows={n_rows} train_rows={split} train_windows={len(x_train)} val_windows={len(x_val)}")

    t_fit = time.monotonic()
    model, loss, val_loss, model_bytes = fit_and_convert(x_train, x_val, args)
    fit_s = time.monotonic() - t_fit
    print(f"trained+converted in {fit_s:.1f}s; loss={loss[-1]:.5f} val_loss={val_loss[-1]:.5f}")

    determinism: dict[str, Any] = {"checked_in_process": False}
    if args.check_determinism:
        _, loss2, _, bytes2 = fit_and_convert(x_train, x_val, args)
        determinism = {
            "checked_in_process": True,
            "identical_tflite": bytes2 == model_bytes,
            "identical_loss_curve": loss2 == loss,
        }
        print(f"determinism: {determinism}")

    # --- float reference and int8 evaluation (agent-equivalent) on the validation windows
    float_val = np.asarray(model.predict(x_val, batch_size=256, verbose=0), dtype=np.float32)
    float_scores = scores(float_val, x_val)
    int8_val = run_int8(make_interpreter(model_bytes), x_val, batch=64)
    int8_scores = scores(int8_val, x_val)
    batch_diff = check_batches(model_bytes, x_val)

    interp = make_interpreter(model_bytes)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    in_scale, in_zp = quant_params(inp)
    out_scale, out_zp = quant_params(out)
    if inp["dtype"] is not np.int8 or out["dtype"] is not np.int8:
        raise RuntimeError(f"expected int8 I/O, got {inp['dtype']} / {out['dtype']}")
    if list(inp["shape_signature"]) != [-1, x_val.shape[1]]:
        raise RuntimeError(f"input batch dim not resizable: {inp['shape_signature']}")
    tensor_types = {str(t["dtype"].__name__) for t in interp.get_tensor_details()}

    in_lo, in_hi = (-128 - in_zp) * in_scale, (127 - in_zp) * in_scale
    out_lo, out_hi = (-128 - out_zp) * out_scale, (127 - out_zp) * out_scale
    onnx_bytes = export_onnx(model, (in_lo, in_hi), (out_lo, out_hi))
    onnx_val = run_onnx(onnx_bytes, x_val)
    onnx_scores = scores(onnx_val, x_val)
    onnx_vs_int8 = np.abs(onnx_scores - int8_scores)
    if not np.all(onnx_vs_int8 <= ONNX_ABS_TOL + ONNX_REL_TOL * int8_scores):
        raise RuntimeError(f"ONNX export disagrees with the int8 model: max score diff "
                           f"{onnx_vs_int8.max():.4f}")
    sat_frac = float(np.mean((x_val < in_lo) | (x_val > in_hi)))
    score_abs = np.abs(int8_scores - float_scores)
    pearson = float(np.corrcoef(float_scores, int8_scores)[0, 1])
    spearman = float(np.corrcoef(rank(float_scores), rank(int8_scores))[0, 1])

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.tflite").write_bytes(model_bytes)
    (args.out / "model.onnx").write_bytes(onnx_bytes)
    arch = (
        f"dense autoencoder {x_train.shape[1]} -> {args.hidden} (relu) -> {args.bottleneck} "
        f"(linear) -> {args.hidden} (relu) -> {x_train.shape[1]} (linear); "
        f"{int(model.count_params())} parameters; MSE loss, Adam lr={args.learning_rate}, "
        f"batch {args.batch_size}"
    )
    card: dict[str, Any] = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "format": "tflite",
        "file": "model.tflite",
        "sha256": sha256_bytes(model_bytes),
        "size": len(model_bytes),
        # Other formats of the same model in this release (agent/scoring/card.py); a device
        # runs the one its backends run best (agent/scoring/registry.py).
        "variants": [
            {
                "format": "onnx",
                "file": "model.onnx",
                "sha256": sha256_bytes(onnx_bytes),
                "size": len(onnx_bytes),
                "dtype": "float32",
                "opset": ONNX_OPSET,
                "source": "the same trained Keras model as model.tflite, before int8 "
                "quantisation (keras Model.export format=onnx), input and output clipped to "
                "the int8 tensors' representable ranges",
                "tolerance": {
                    "rule": "|score - tflite score| <= abs + rel * tflite score, on windows "
                    "inside input.representable_range",
                    "abs": ONNX_ABS_TOL,
                    "rel": ONNX_REL_TOL,
                },
                "validation_score_abs_diff_max": round(float(onnx_vs_int8.max()), 6),
                "validation_score_abs_diff_mean": round(float(onnx_vs_int8.mean()), 6),
                "float_vs_keras_max_abs_diff": round(float(np.abs(onnx_val - float_val).max()),
                                                     8),
            }
        ],
        "input": {
            "window": args.window,
            "fields": FIELDS,
            "layout": "time_major_flat",
            "shape": [-1, args.window * N_CHANNELS],
            "dtype": "int8",
            "quantization": {"scale": in_scale, "zero_point": in_zp},
            "representable_range": [in_lo, in_hi],
        },
        "output": {
            "shape": [-1, args.window * N_CHANNELS],
            "dtype": "int8",
            "quantization": {"scale": out_scale, "zero_point": out_zp},
            "kind": "reconstruction",
        },
        "preprocessing": {
            "normalisation": "warmup_robust",
            "transforms": TRANSFORMS,
            "agent": (
                "agent.pipeline.features.Scaling('warmup', window=window, "
                "transforms=transforms) fitted on the stream's raw warm-up samples (its "
                "first 400 rows); apply() to every raw (n, window, fields) window before "
                "scoring"
            ),
            "formula": (
                "per window: x[:, diff fields] -= their mean over the window; x_norm = "
                "(x - median) / spread, median and spread = max(1.4826 MAD, 5%-trimmed std, "
                "1e-6 (1 + |median|)) of the transformed warm-up windows; q = clip(round("
                "x_norm / scale) + zero_point, -128, 127)"
            ),
        },
        "score": {
            "kind": "reconstruction_mse",
            "formula": "mean over the 128 elements of ((q_out - zero_point_out) * scale_out - "
            "x_norm)^2, x_norm unclipped",
            "validation_windows": len(x_val),
            "validation_quantiles": quantiles(int8_scores),
            "validation_quantiles_float": quantiles(float_scores),
        },
        "training": {
            "data": (
                f"SKAB anomaly-free/anomaly-free.csv ({n_rows} rows, {stamps[0]} .. "
                f"{stamps[-1]}, 1 Hz nominal; valve1 never used)"
            ),
            "data_sha256": sha256_bytes(data_path.read_bytes()),
            "split": (
                f"time-ordered: first {split} rows train, last {n_rows - split} rows "
                f"validation (windows never straddle the split); simulated warm-ups of "
                f"{WARMUP} rows every {args.segment_step} rows, each conditioning the next "
                f"{args.horizon} rows"
            ),
            "windows": len(x_train),
            "validation_windows": len(x_val),
            "hop": args.train_hop,
            "segment_step": args.segment_step,
            "horizon": args.horizon,
            "epochs": args.epochs,
            "seed": args.seed,
            "tensorflow": tf.__version__,
            "keras": str(keras.__version__),
            "architecture": arch,
            "final_train_loss": round(loss[-1], 6),
            "final_val_loss": round(val_loss[-1], 6),
            "quantisation": (
                "full integer (TFLITE_BUILTINS_INT8), int8 input/output; calibrated on "
                f"{args.rep_samples} evenly spaced training windows plus 2x-scaled copies of "
                f"every 4th clipped to +/-{args.rep_range} std"
            ),
            "tensor_dtypes": sorted(tensor_types),
            "determinism": determinism,
        },
        "metrics": {
            "val_mse_float": round(float(float_scores.mean()), 6),
            "val_mse_int8": round(float(int8_scores.mean()), 6),
            "int8_vs_float_max_abs_diff": round(float(np.abs(int8_val - float_val).max()), 6),
            "int8_vs_float_mean_abs_diff": round(float(np.abs(int8_val - float_val).mean()), 6),
            "score_abs_diff_max": round(float(score_abs.max()), 6),
            "score_pearson": round(pearson, 6),
            "score_spearman": round(spearman, 6),
            "val_input_saturated_fraction": round(sat_frac, 8),
            "batch1_vs_batch64_max_abs_diff": batch_diff,
        },
        "command": "../.venv-train/bin/python scripts/train_model.py --out models/skab-ae",
    }
    (args.out / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: card[k] for k in ("sha256", "size", "score", "metrics")}, indent=2))
    print(f"wrote model.tflite, model.onnx and model.json to {args.out} in "
          f"{time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
