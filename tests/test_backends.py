"""Inference backends: ONNX Runtime and LiteRT for real; TensorRT through a fake runtime.

ONNX Runtime runs for real on the CPU here (setup.sh installs the ``onnx`` extra), and so
does LiteRT. TensorRT and a CUDA GPU cannot be installed on this machine: the tests named
``*_fake_tensorrt*`` drive the real TensorRTBackend / EngineCache code with a stand-in
runtime (it "builds" a tagged blob and runs the ONNX model with onnxruntime) to check the
cache key, the refusal of engines from another GPU or TensorRT version and the staging hook.
The tests that need the real thing skip with that reason; scripts/check_tensorrt.sh runs
them on a CUDA machine.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import ConfigError, parse_config
from agent.fleet.manifest import Refusal
from agent.pipeline.features import Scaling
from agent.scoring import ModelError, builtin_models_dir, load_card, open_scorer
from agent.scoring import registry as reg
from agent.scoring.litert import DelegateError, LiteRTBackend
from agent.scoring.onnx import OnnxRuntimeBackend
from agent.scoring.tensorrt import EngineIdentity, TensorRTBackend, tensorrt_usable

from .conftest import REPO, agent_config

SKAB = REPO.parent / "shared" / "data" / "skab"
MODEL = builtin_models_dir() / "skab-ae"


def _stream(tmp_path: Path, **over: Any):
    return parse_config(agent_config(tmp_path, 1883, **over), base_dir=REPO).streams[0]


def _rows(path: Path, fields: tuple[str, ...]) -> np.ndarray:
    with path.open(newline="") as f:
        r = csv.reader(f, delimiter=";")
        head = next(r)
        idx = [head.index(x) for x in fields]
        return np.array([[float(row[i]) for i in idx] for row in r if row], np.float32)


def _windows(x: np.ndarray, hop: int = 4) -> np.ndarray:
    n = x.shape[0] - 16 + 1
    return np.stack([x[i:i + 16].reshape(-1) for i in range(0, n, hop)]).astype(np.float32)


def _device_scaled(raw: np.ndarray, card) -> np.ndarray:
    """Windows of ``raw`` scaled as a device does: fitted on its first 400 rows."""
    sc = Scaling("warmup", card.mean, card.std, window=16, transforms=list(card.transforms))
    sc.learn(raw[:400])
    sc.freeze()
    w = np.stack([raw[i:i + 16] for i in range(0, raw.shape[0] - 15, 4)]).astype(np.float32)
    sc.apply(w)
    return w.reshape(w.shape[0], -1)


def real_windows(card) -> tuple[np.ndarray, str]:
    """Scaled SKAB windows: the model's own validation tail and valve1 runs, each scaled by
    its first 400 rows (what normalise: warmup does on a device)."""
    if not SKAB.is_dir():
        # A fresh checkout without ../shared: the comparison still runs, on synthetic windows.
        rng = np.random.default_rng(0)
        w = rng.normal(0, 1, (1500, 128)).astype(np.float32)
        w[::7] *= 3
        return w, "synthetic (../shared/data/skab absent)"
    free = _rows(SKAB / "anomaly-free" / "anomaly-free.csv", card.fields)
    parts = [_device_scaled(free[-1341:], card)]
    for name in ("0.csv", "1.csv", "2.csv"):
        p = SKAB / "valve1" / name
        if p.is_file():
            parts.append(_device_scaled(_rows(p, card.fields), card))
    return np.concatenate(parts), "SKAB anomaly-free validation tail + valve1"


def test_onnx_and_litert_agree_on_the_shipped_model_within_the_stated_tolerance(tmp_path):
    """Both files of models/skab-ae, run by their own backends through ModelScorer.

    Tolerance (the card's variants[].tolerance, set by scripts/train_model.py):
    |onnx - tflite| <= 0.03 + 0.05 x tflite score on windows inside the int8 input range;
    windows beyond it (the int8 model saturates) must rank the same (Spearman >= 0.95).
    """
    card = load_card(MODEL / "model.json")
    (onnx_file,) = [f for f in card.variants if f.format == "onnx"]
    tol = json.loads((MODEL / "model.json").read_text())["variants"][0]["tolerance"]
    assert (tol["abs"], tol["rel"]) == (0.03, 0.05)
    w, what = real_windows(card)
    lite = open_scorer(card, _stream(tmp_path, backend="litert", batch=256))
    onnx = open_scorer(card, _stream(tmp_path, backend="onnxruntime", batch=256))
    assert isinstance(onnx.backend, OnnxRuntimeBackend)
    assert onnx.backend.providers == ["CPUExecutionProvider"]
    a = np.concatenate([lite.score(w[i:i + 256]) for i in range(0, len(w), 256)])
    b = np.concatenate([onnx.score(w[i:i + 256]) for i in range(0, len(w), 256)])
    lo, hi = card.raw["input"]["representable_range"]
    inside = np.all((w >= lo) & (w <= hi), axis=1)
    diff = np.abs(a - b)
    assert inside.sum() > 500, what
    bad = diff[inside] > tol["abs"] + tol["rel"] * a[inside]
    assert not bad.any(), (f"{what}: {bad.sum()} windows out of tolerance, max diff "
                           f"{diff[inside].max():.4f}")
    if (~inside).sum() > 10:
        ra, rb = np.argsort(np.argsort(a[~inside])), np.argsort(np.argsort(b[~inside]))
        assert np.corrcoef(ra, rb)[0, 1] >= 0.95
    assert onnx_file.sha256 == hashlib.sha256(onnx_file.path.read_bytes()).hexdigest()


def test_onnx_backend_batches_agree_and_shapes_are_checked():
    b = OnnxRuntimeBackend(MODEL / "model.onnx", max_batch=16)
    x = np.random.default_rng(0).normal(size=(11, 128)).astype(np.float32)
    full = b.predict(x)
    one = np.stack([b.predict(x[i:i + 1])[0] for i in range(11)])
    np.testing.assert_allclose(full, one, atol=1e-5)
    assert b.input_shape == (128,) and b.output_shape == (128,)
    with pytest.raises(ValueError, match="max_batch"):
        b.predict(np.zeros((17, 128), np.float32))
    with pytest.raises(ValueError, match="input shape"):
        b.predict(np.zeros((2, 64), np.float32))
    with pytest.raises(ValueError, match="not in this onnxruntime build"):
        OnnxRuntimeBackend(MODEL / "model.onnx", 4, providers=["CUDAExecutionProvider"])


def test_auto_picks_litert_on_a_cpu_machine_and_says_why(tmp_path):
    card = load_card(MODEL / "model.json")
    s = _stream(tmp_path)
    choices, skipped = reg.plan_backends(card, s)
    assert [(c.backend, c.file.format) for c in choices] == [("litert", "tflite"),
                                                            ("onnxruntime", "onnx")]
    assert "validated" in choices[0].reason
    if tensorrt_usable() is not None:
        assert any(x.startswith("tensorrt:") for x in skipped)
    scorer = open_scorer(card, s)
    assert isinstance(scorer.backend, LiteRTBackend)
    assert scorer.backend.selection.startswith("litert on model.tflite")


def test_explicit_backend_that_cannot_run_here_is_a_model_error(tmp_path, monkeypatch):
    card = load_card(MODEL / "model.json")
    monkeypatch.setattr(reg, "_tensorrt_missing", lambda o: "tensorrt is not installed")
    monkeypatch.setitem(reg.BACKENDS, "tensorrt", dataclasses.replace(
        reg.BACKENDS["tensorrt"], missing=lambda o: "tensorrt is not installed"))
    with pytest.raises(ModelError, match="tensorrt is not installed"):
        open_scorer(card, _stream(tmp_path, backend="tensorrt"))
    only_tflite = dataclasses.replace(card, variants=())
    with pytest.raises(ModelError, match="runs onnx"):
        open_scorer(only_tflite, _stream(tmp_path, backend="onnxruntime"))


@pytest.mark.parametrize("delegate", ["edgetpu", "/nonexistent/libdelegate.so", "libm.so.6"])
def test_delegate_that_fails_refuses_the_stream_or_auto_falls_back(tmp_path, delegate, caplog):
    """Real LiteRT; the Edge TPU runtime is not installed here and libm is no delegate."""
    card = load_card(MODEL / "model.json")
    opts = {"delegate": delegate}
    with pytest.raises(DelegateError):
        LiteRTBackend(card.path, 4, delegate=delegate)
    with pytest.raises(ModelError, match="delegate"):
        open_scorer(card, _stream(tmp_path, backend="litert", backend_options=opts))
    scorer = open_scorer(card, _stream(tmp_path, backend_options=opts))
    assert isinstance(scorer.backend, LiteRTBackend) and not scorer.backend.delegate
    assert "falls back to litert without the delegate" in caplog.text


def test_broken_model_file_is_refused_not_swapped_for_another_format(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODEL, d)
    junk = b"not a flatbuffer" * 100
    (d / "model.tflite").write_bytes(junk)
    raw = json.loads((d / "model.json").read_text())
    raw.update(sha256=hashlib.sha256(junk).hexdigest(), size=len(junk))
    (d / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="not a loadable TFLite model"):
        open_scorer(load_card(d / "model.json"), _stream(tmp_path))


def test_card_variants_are_checked_and_a_missing_one_is_skipped(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODEL, d)
    assert [f.format for f in load_card(d / "model.json").files] == ["tflite", "onnx"]
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelError, match=r"onnx.*(sha256|bytes)"):
        load_card(d / "model.json")
    (d / "model.onnx").unlink()
    assert [f.format for f in load_card(d / "model.json").files] == ["tflite"]


def test_backend_config_fields_and_their_checks(tmp_path):
    s = _stream(tmp_path, backend="onnxruntime",
                backend_options={"threads": 2, "providers": ["CPUExecutionProvider"]})
    assert s.backend == "onnxruntime" and s.backend_options.threads == 2
    with pytest.raises(ConfigError) as e:
        _stream(tmp_path, backend="litert", backend_options={"providers": ["Cuda"]})
    text = "\n".join(e.value.problems)
    assert "providers: only onnxruntime" in text and "not an onnxruntime provider" in text
    with pytest.raises(ConfigError, match="backend: must be one of"):
        _stream(tmp_path, backend="openvino")
    with pytest.raises(ConfigError, match="only litert loads delegates"):
        _stream(tmp_path, backend="tensorrt", backend_options={"delegate": "edgetpu"})


def test_check_config_says_which_backend_and_why(tmp_path):
    from typer.testing import CliRunner

    from agent.cli import app

    cfg = agent_config(tmp_path, 1883)
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(cfg))
    out = CliRunner().invoke(app, ["check-config", str(path)])
    assert out.exit_code == 0, out.output
    assert "stream pump: model skab-ae v1, backend litert on model.tflite" in out.output


# -- TensorRT ------------------------------------------------------------------------


class FakeTensorRT:
    """FAKE TensorRT runtime (no TensorRT or CUDA GPU here): build() tags a blob with the GPU
    and version; load() refuses another version's blob like TensorRT does and runs the ONNX
    model with onnxruntime on the CPU."""

    def __init__(self, gpu: str = "Orin", cc: str = "8.7", version: str = "10.3.0") -> None:
        self._gpu, self._cc, self.version = gpu, cc, version
        self.builds = 0

    def gpu(self) -> tuple[str, str]:
        return self._gpu, self._cc

    def build(self, onnx: bytes, precision: str, max_batch: int, workspace: int) -> bytes:
        self.builds += 1
        head = json.dumps({"v": self.version, "gpu": self._gpu, "p": precision}).encode()
        return head + b"\n" + onnx

    def load(self, engine: bytes, max_batch: int) -> Any:
        head, onnx = engine.split(b"\n", 1)
        if json.loads(head)["v"] != self.version:
            return None
        tmp = Path(self._tmp) / "m.onnx"
        tmp.write_bytes(onnx)
        b = OnnxRuntimeBackend(tmp, max_batch)
        b.run = b.predict  # type: ignore[attr-defined]
        return b


def _fake(tmp_path: Path, **kw: str) -> FakeTensorRT:
    rt = FakeTensorRT(**kw)
    rt._tmp = str(tmp_path)  # type: ignore[attr-defined]
    return rt


def test_engine_cache_key_covers_model_gpu_version_precision_and_batch():
    base = EngineIdentity("ab" * 32, "Orin", "8.7", "10.3.0", "fp16", 32)
    keys = {base.key}
    for change in ({"model_sha256": "cd" * 32}, {"gpu": "Xavier"}, {"compute_capability": "7.2"},
                   {"tensorrt": "10.4.0"}, {"precision": "fp32"}, {"max_batch": 64}):
        keys.add(dataclasses.replace(base, **change).key)
    assert len(keys) == 7


def test_fake_tensorrt_builds_once_caches_and_refuses_another_gpus_engine(tmp_path, caplog):
    cache = tmp_path / "engines"
    rt = _fake(tmp_path)
    a = TensorRTBackend(MODEL / "model.onnx", 8, precision="fp16", cache_dir=cache, runtime=rt)
    assert a.built and rt.builds == 1 and a.engine_path and a.engine_path.is_file()
    b = TensorRTBackend(MODEL / "model.onnx", 8, precision="fp16", cache_dir=cache, runtime=rt)
    assert not b.built and rt.builds == 1  # taken from the cache
    x = np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32)
    np.testing.assert_allclose(a.predict(x), b.predict(x), atol=1e-6)
    # The state dir moved to a Xavier: its record says Orin -> refused, rebuilt, replaced.
    other = _fake(tmp_path, gpu="Xavier", cc="7.2")
    c = TensorRTBackend(MODEL / "model.onnx", 8, precision="fp16", cache_dir=cache, runtime=other)
    assert c.built and other.builds == 1
    assert "refusing cached TensorRT engine" in caplog.text and "built for Orin" in caplog.text
    record = json.loads(c.engine_path.with_suffix(".json").read_text())
    assert record["gpu"] == "Xavier"
    # A TensorRT upgrade: refused by the record too.
    caplog.clear()
    newer = _fake(tmp_path, gpu="Xavier", cc="7.2", version="10.4.0")
    TensorRTBackend(MODEL / "model.onnx", 8, precision="fp16", cache_dir=cache, runtime=newer)
    assert newer.builds == 1 and "TensorRT 10.3.0" in caplog.text


def test_fake_tensorrt_rebuilds_an_engine_whose_bytes_changed(tmp_path, caplog):
    cache = tmp_path / "engines"
    rt = _fake(tmp_path)
    a = TensorRTBackend(MODEL / "model.onnx", 4, cache_dir=cache, runtime=rt)
    a.engine_path.write_bytes(a.engine_path.read_bytes() + b"x")
    TensorRTBackend(MODEL / "model.onnx", 4, cache_dir=cache, runtime=rt)
    assert rt.builds == 2 and "bytes changed" in caplog.text


def test_fake_tensorrt_prebuilt_engine_from_another_version_is_a_model_error(tmp_path,
                                                                              monkeypatch):
    eng = tmp_path / "m" / "model.engine"
    eng.parent.mkdir()
    eng.write_bytes(_fake(tmp_path, version="8.6.1").build(b"onnx", "fp16", 4, 0))
    with pytest.raises(ValueError, match="cannot load this engine"):
        TensorRTBackend(eng, 4, fmt="engine", runtime=_fake(tmp_path))


def test_fake_tensorrt_staging_hook_builds_under_state_dir(tmp_path, monkeypatch):
    """What the fleet manager's staging does (open_scorer with state_dir) with a FAKE
    TensorRT: the engine is built before the canary and cached under <state_dir>/engines."""
    rt = _fake(tmp_path)
    monkeypatch.setitem(reg.BACKENDS, "tensorrt", dataclasses.replace(
        reg.BACKENDS["tensorrt"], missing=lambda o: None,
        open=lambda c, s, sd: TensorRTBackend(c.file.path, s.batch, cache_dir=reg._engine_dir(
            s.backend_options, sd), fmt=c.file.format, runtime=rt)))
    card = load_card(MODEL / "model.json")
    s = _stream(tmp_path)
    assert reg.plan_backends(card, s)[0][0].backend == "tensorrt"  # auto: GPU first
    assert reg.device_formats(s)[:2] == ["engine", "onnx"]
    state = tmp_path / "state"
    scorer = open_scorer(card, s, state)
    assert isinstance(scorer.backend, TensorRTBackend) and rt.builds == 1
    assert list((state / "engines").glob("*.engine"))
    open_scorer(card, s, state)
    assert rt.builds == 1  # the swap / a restart reuses it


@pytest.mark.skipif(tensorrt_usable() is not None,
                    reason=f"real TensorRT needs tensorrt + an NVIDIA GPU ({tensorrt_usable()}); "
                           "scripts/check_tensorrt.sh runs this on a CUDA machine")
def test_real_tensorrt_matches_onnxruntime_and_caches(tmp_path):
    cache = tmp_path / "engines"
    a = TensorRTBackend(MODEL / "model.onnx", 32, precision="fp32", cache_dir=cache)
    assert a.built
    b = TensorRTBackend(MODEL / "model.onnx", 32, precision="fp32", cache_dir=cache)
    assert not b.built
    x = np.random.default_rng(0).normal(size=(32, 128)).astype(np.float32)
    ref = OnnxRuntimeBackend(MODEL / "model.onnx", 32).predict(x)
    np.testing.assert_allclose(b.predict(x), ref, atol=1e-3)
    np.testing.assert_allclose(b.predict(x[:3]), ref[:3], atol=1e-3)
    h = TensorRTBackend(MODEL / "model.onnx", 32, precision="fp16", cache_dir=cache)
    np.testing.assert_allclose(h.predict(x), ref, atol=5e-2)


# -- fleet -----------------------------------------------------------------------------


def _manifest_with_variants():
    from agent.fleet.manifest import parse_manifest

    raw = json.loads((MODEL / "model.json").read_text())
    doc = {"schema": 1, "name": "skab-ae", "version": 2, "format": "tflite",
           "file": "model.tflite", "sha256": raw["sha256"], "size": raw["size"],
           "chunk_size": 4096, "chunks": -(-raw["size"] // 4096), "input": raw["input"],
           "created": 0, "expires": 1e12, "key_id": "k",
           "variants": [{k: v[k] for k in ("format", "file", "sha256", "size")}
                        for v in raw["variants"]]}
    return parse_manifest(json.dumps(doc).encode()), raw


def test_a_release_with_several_formats_is_taken_in_the_format_the_device_runs_best():
    from agent.fleet.receiver import ModelReceiver

    m, raw = _manifest_with_variants()
    assert m.formats() == ["tflite", "onnx"]

    r = ModelReceiver.__new__(ModelReceiver)  # only _select is exercised: no broker, no store
    r._formats = lambda _m: ["engine", "onnx", "tflite"]  # a Jetson with TensorRT
    got = r._select(m)
    assert (got.format, got.file, got.sha256) == ("onnx", "model.onnx",
                                                  raw["variants"][0]["sha256"])
    assert got.chunks == -(-raw["variants"][0]["size"] // 4096)
    card = got.card()
    assert (card["format"], card["file"], card["size"]) == ("onnx", "model.onnx",
                                                          raw["variants"][0]["size"])
    r._formats = lambda _m: ["tflite", "onnx"]  # a Pi
    assert r._select(m).format == "tflite"
    r._formats = lambda _m: ["engine"]
    with pytest.raises(Refusal) as e:
        r._select(m)
    assert e.value.code == "unsupported_format"
