import json
import shutil

import numpy as np
import pytest

from agent.config import parse_config
from agent.pipeline import ScoreBatch, StreamPipeline
from agent.scoring import (
    SCORERS,
    ModelError,
    builtin_models_dir,
    find_model,
    load_card,
    open_scorer,
)
from agent.scoring.backend import Backend
from agent.scoring.litert import LiteRTBackend
from agent.scoring.registry import backend_entry

from .conftest import REPO, agent_config


def test_shipped_model_card_matches_its_file(card):
    assert card.name == "skab-ae"
    assert card.window == 16
    assert len(card.fields) == 8
    assert card.size == card.path.stat().st_size
    assert card.size < 64 * 1024  # "tens of KB"
    assert "command" in card.raw and "train_model.py" in card.raw["command"]


def test_backend_reads_int8_quantisation_from_the_tensors(card):
    b = LiteRTBackend(card.path, max_batch=8)
    q = b.quantization
    assert q["input"] is not None and q["output"] is not None
    assert q["input"][0] == pytest.approx(card.raw["input"]["quantization"]["scale"])
    assert q["input"][1] == card.raw["input"]["quantization"]["zero_point"]
    assert b.input_shape == (128,) and b.output_shape == (128,)


def test_backend_batches_agree_with_single_calls(card):
    b = LiteRTBackend(card.path, max_batch=16)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(11, 128)).astype(np.float32)
    full = b.predict(x)
    one = np.stack([b.predict(x[i:i + 1])[0] for i in range(11)])
    np.testing.assert_array_equal(full, one)
    assert full.dtype == np.float32 and full.shape == (11, 128)


def test_backend_rejects_wrong_shapes_and_oversized_batches(card):
    b = LiteRTBackend(card.path, max_batch=4)
    with pytest.raises(ValueError, match="input shape"):
        b.predict(np.zeros((2, 64), np.float32))
    with pytest.raises(ValueError, match="max_batch"):
        b.predict(np.zeros((5, 128), np.float32))


def _stream(tmp_path, **over):
    return parse_config(agent_config(tmp_path, 1883, **over), base_dir=REPO).streams[0]


def test_scorer_separates_normal_from_anomalous_windows(card, tmp_path):
    s = open_scorer(card, _stream(tmp_path))
    rng = np.random.default_rng(1)
    normal = (card.mean + card.std * 0.3 * rng.standard_normal((32, 16, 8))).astype(np.float32)
    shifted = normal.copy()
    shifted[:, :, 2] += card.std[2] * 8
    a = s.score((normal - card.mean) / card.std)
    b = s.score((shifted - card.mean) / card.std)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert np.median(b) > 3 * np.median(a)


def test_registry_is_explicit():
    assert {"tflite", "gaussian", "hst"} <= set(SCORERS)
    assert [k for k, e in SCORERS.items() if e.file_based] == ["tflite", "onnx", "engine"]


class _ToyBackend(Backend):
    """A backend defined here and nowhere else: 'reconstructs' every window as zeros."""

    KEY = "toy"

    def __init__(self, path, max_batch):
        self.n = len(path.read_bytes())

    @property
    def input_shape(self):
        return (128,)

    @property
    def output_shape(self):
        return (128,)

    def predict(self, batch):
        return np.zeros_like(batch)


def _card_for(tmp_path, fmt, payload=b"toy model"):
    import hashlib

    d = _copy_model(tmp_path)
    (d / "model.toy").write_bytes(payload)
    raw = json.loads((d / "model.json").read_text())
    raw.update(format=fmt, file="model.toy", sha256=hashlib.sha256(payload).hexdigest(),
               size=len(payload))
    (d / "model.json").write_text(json.dumps(raw))
    return d / "model.json"


def test_a_new_backend_is_one_class_and_one_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(SCORERS, "toy", backend_entry(_ToyBackend))
    card = load_card(_card_for(tmp_path, "toy"))
    s = _stream(tmp_path, warmup=64)
    pipe = StreamPipeline(s, card, open_scorer(card, s))
    rng = np.random.default_rng(0)
    x = (card.mean + card.std * rng.standard_normal((200, 8))).astype(np.float32)
    events = pipe.push(1e9 + np.arange(200.0), x)
    batches = [e for e in events if isinstance(e, ScoreBatch)]
    # Reconstructing zeros: the score is the mean square of the scaled window.
    assert batches and all(np.all(b.raw > 0) for b in batches)
    assert pipe.windows_scored == (200 - 16) // 4 + 1


def test_a_backend_that_fails_to_load_is_a_model_error(tmp_path, monkeypatch):
    class Broken(_ToyBackend):
        def __init__(self, path, max_batch):
            import not_an_installed_runtime  # noqa: F401

    monkeypatch.setitem(SCORERS, "toy", backend_entry(Broken))
    card = load_card(_card_for(tmp_path, "toy"))
    with pytest.raises(ModelError, match="could not be loaded: ModuleNotFoundError"):
        open_scorer(card, _stream(tmp_path))


def test_unknown_format_and_path_like_file_are_refused(tmp_path):
    with pytest.raises(ModelError, match="has no backend here"):
        load_card(_card_for(tmp_path, "onnx-nope"))
    p = _card_for(tmp_path / "b", "tflite")
    raw = json.loads(p.read_text())
    raw["file"] = "../../etc/passwd"
    p.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="plain file name"):
        load_card(p)


def _copy_model(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(builtin_models_dir() / "skab-ae", dst)
    return dst


def test_truncated_model_is_refused(tmp_path):
    d = _copy_model(tmp_path)
    data = (d / "model.tflite").read_bytes()
    (d / "model.tflite").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        load_card(d / "model.json")


def test_tampered_model_is_refused(tmp_path):
    d = _copy_model(tmp_path)
    data = bytearray((d / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="tampered"):
        load_card(d / "model.json")


def test_garbage_model_with_matching_card_fails_to_load_clearly(tmp_path):
    import hashlib

    d = _copy_model(tmp_path)
    junk = b"not a flatbuffer" * 100
    (d / "model.tflite").write_bytes(junk)
    raw = json.loads((d / "model.json").read_text())
    raw.update(sha256=hashlib.sha256(junk).hexdigest(), size=len(junk))
    (d / "model.json").write_text(json.dumps(raw))
    c = load_card(d / "model.json")
    with pytest.raises(ModelError, match="not a loadable TFLite model"):
        open_scorer(c, _stream(tmp_path))


def test_bad_cards(tmp_path):
    d = _copy_model(tmp_path)
    (d / "model.json").write_text("{")
    with pytest.raises(ModelError, match="unreadable model card"):
        load_card(d / "model.json")
    (d / "model.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelError, match="missing or has a bad"):
        load_card(d / "model.json")


def test_find_model_by_name_dir_and_json(tmp_path):
    assert find_model("skab-ae", tmp_path).name == "model.json"
    d = _copy_model(tmp_path)
    assert find_model("m", tmp_path) == d / "model.json"
    assert find_model(str(d / "model.tflite"), tmp_path) == d / "model.json"
    with pytest.raises(ModelError, match="not found"):
        find_model("nope", tmp_path)


def test_float32_model_runs(tmp_path):
    path = REPO / "tests" / "data" / "float-ae.tflite"
    b = LiteRTBackend(path, max_batch=4)
    assert b.quantization == {"input": None, "output": None}
    out = b.predict(np.ones((3, *b.input_shape), np.float32))
    assert out.shape == (3, *b.output_shape) and np.all(np.isfinite(out))
