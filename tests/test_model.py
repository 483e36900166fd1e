import json
import shutil

import numpy as np
import pytest

from agent.backends import BACKENDS, LiteRTBackend
from agent.scoring import ModelError, Scorer, builtin_models_dir, find_model, load_card

from .conftest import REPO


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


def test_scorer_separates_normal_from_anomalous_windows(card):
    s = Scorer(card, max_batch=32)
    rng = np.random.default_rng(1)
    normal = (card.mean + card.std * 0.3 * rng.standard_normal((32, 16, 8))).astype(np.float32)
    shifted = normal.copy()
    shifted[:, :, 2] += card.std[2] * 8
    a = s.score((normal - card.mean) / card.std)
    b = s.score((shifted - card.mean) / card.std)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert np.median(b) > 3 * np.median(a)


def test_registry_is_explicit():
    assert {"tflite": LiteRTBackend} == BACKENDS


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
        Scorer(c, max_batch=4)


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
