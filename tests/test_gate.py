"""The patch gate: labels, pipeline fidelity, threshold tuning, safe persistence, use inside AutoPatcher."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from autopatch.errors import GateFileError
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from classifiers.features import FeatureSpec
from classifiers.gate import PatchGate, model_fingerprint
from classifiers.labels import NEUTRAL_WEIGHT, Label, gate_labels
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

SPEC = FeatureSpec(layers=(1, 2), positions=("span_end", "last"))
PROFILE = PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model_for_bytes("llama")


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    dim = len(SPEC.layers) * len(SPEC.positions) * 32 + 3
    X = rng.normal(size=(n, dim))
    y = (X[:, 0] + 0.3 * rng.normal(size=n) > 0.5).astype(int)
    return X, y


@pytest.fixture()
def gate(model):
    X, y = _data()
    return PatchGate.fit(X, y, np.ones(len(y)), spec=SPEC, profile=PROFILE, model=model, n_components=8)


def test_labels_follow_the_documented_definition():
    table = {"vanilla": {"a": {"em": 0.0}, "b": {"em": 1.0}, "c": {"em": 1.0}, "d": {"em": 0.0}},
             "cfg": {"a": {"em": 1.0}, "b": {"em": 0.0}, "c": {"em": 1.0}, "d": {"em": 0.0}}}
    labels = gate_labels(table, "cfg")
    assert [labels[i].target for i in "abcd"] == [1, 0, 0, 0]
    assert [labels[i].weight for i in "abcd"] == [1.0, 1.0, NEUTRAL_WEIGHT, NEUTRAL_WEIGHT]
    assert Label(0.0, 1.0).helps and Label(1.0, 0.0).hurts


def test_numpy_inference_matches_the_sklearn_pipeline_and_learns(gate):
    X, y = _data(seed=1)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, gate.scores(X)) > 0.8  # held-out data from the same rule


def test_threshold_maximises_end_to_end_accuracy(gate):
    X, y = _data(seed=2)
    vanilla = np.zeros(len(y))
    patched = y.astype(float)  # patching is right exactly where it helps
    t = gate.tune_threshold(X, vanilla, patched)
    chosen = np.where(gate.scores(X) >= t, patched, vanilla).mean()
    for other in np.linspace(0, 1, 21):
        assert chosen >= np.where(gate.scores(X) >= other, patched, vanilla).mean()


def test_save_load_round_trip_without_pickle(gate, model, tmp_path):
    gate.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.json", "gate.npz"]
    loaded = PatchGate.load(tmp_path, model=model)
    X, _ = _data(seed=3)
    np.testing.assert_allclose(loaded.scores(X), gate.scores(X))
    assert loaded.profile == gate.profile and loaded.spec == gate.spec and loaded.threshold == gate.threshold


def test_tampered_wrong_version_and_wrong_model_are_refused(gate, model, tmp_path):
    gate.save(tmp_path)
    blob = bytearray((tmp_path / "gate.npz").read_bytes())
    blob[-10] ^= 0xFF
    (tmp_path / "gate.npz").write_bytes(bytes(blob))
    with pytest.raises(GateFileError, match="checksum"):
        PatchGate.load(tmp_path)
    gate.save(tmp_path)
    header = json.loads((tmp_path / "gate.json").read_text())
    (tmp_path / "gate.json").write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(GateFileError, match="version"):
        PatchGate.load(tmp_path)
    gate.save(tmp_path)
    other = tiny_model_for_bytes("llama", seed=1)
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(GateFileError, match="another model"):
        PatchGate.load(tmp_path, model=other)
    (tmp_path / "gate.json").write_text("not json")
    with pytest.raises(GateFileError):
        PatchGate.load(tmp_path)


def test_a_pickled_array_file_is_not_loaded(gate, tmp_path):
    gate.save(tmp_path)
    import hashlib
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **{**gate.arrays, "coef": np.array([object()], dtype=object)})
    (tmp_path / "gate.npz").write_bytes(buffer.getvalue())
    header = json.loads((tmp_path / "gate.json").read_text())
    header["arrays_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (tmp_path / "gate.json").write_text(json.dumps(header))
    with pytest.raises(GateFileError, match="pickle"):  # numpy's own ValueError, wrapped with the file's name
        PatchGate.load(tmp_path)


def _resigned(gate, tmp_path, *, threshold=None, **arrays):
    """Save ``gate`` with some arrays (or the threshold) replaced and a fresh, matching checksum."""
    import hashlib
    import io

    gate.save(tmp_path)
    buffer = io.BytesIO()
    np.savez(buffer, **{**gate.arrays, **arrays})
    (tmp_path / "gate.npz").write_bytes(buffer.getvalue())
    header = json.loads((tmp_path / "gate.json").read_text())
    header["arrays_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    if threshold is not None:
        header["threshold"] = threshold
    (tmp_path / "gate.json").write_text(json.dumps(header))
    return tmp_path


@pytest.mark.parametrize("change,match", [
    ({"coef": "nan"}, "'coef' holds NaN"),
    ({"scaler_scale": "zero"}, "'scaler_scale' holds zeros"),
    ({"pca_mean": "short"}, "'pca_mean' has shape"),
    ({"threshold": float("nan")}, "'threshold' is nan"),
    ({"threshold": -1e9}, "'threshold' is -1000000000.0"),
])
def test_a_resigned_gate_with_bad_values_is_refused_at_load(gate, model, tmp_path, change, match):
    arrays = {}
    for key, how in change.items():
        if key == "threshold":
            continue
        value = gate.arrays[key].copy()
        arrays[key] = {"nan": lambda v: v * np.nan, "zero": lambda v: v * 0, "short": lambda v: v[:-1]}[how](value)
    _resigned(gate, tmp_path, threshold=change.get("threshold"), **arrays)
    with pytest.raises(GateFileError, match=match):
        PatchGate.load(tmp_path, model=model)


def test_layers_outside_the_model_and_a_mismatched_width_are_refused(gate, model, tmp_path):
    gate.save(tmp_path)
    header = json.loads((tmp_path / "gate.json").read_text())
    header["feature_spec"]["layers"] = [1, 99]
    (tmp_path / "gate.json").write_text(json.dumps(header))
    with pytest.raises(GateFileError, match=r"layers \[99\] do not exist"):
        PatchGate.load(tmp_path, model=model)
    header["feature_spec"]["layers"] = [1]
    (tmp_path / "gate.json").write_text(json.dumps(header))
    with pytest.raises(GateFileError, match="features but the feature spec gives"):
        PatchGate.load(tmp_path, model=model)


def test_symlinks_oversized_and_broken_archives_are_refused(gate, tmp_path, monkeypatch):
    import hashlib

    import classifiers.gate as gate_module

    real = gate.save(tmp_path / "real")
    link = tmp_path / "link"
    link.mkdir()
    (link / "gate.json").symlink_to(real / "gate.json")
    (link / "gate.npz").symlink_to(real / "gate.npz")
    with pytest.raises(GateFileError, match="symbolic link"):
        PatchGate.load(link)
    monkeypatch.setattr(gate_module, "MAX_GATE_BYTES", 1000)
    with pytest.raises(GateFileError, match="over the 1000-byte limit"):
        PatchGate.load(real)
    monkeypatch.undo()
    (real / "gate.npz").write_bytes(b"PK\x03\x04 not a zip")
    header = json.loads((real / "gate.json").read_text())
    header["arrays_sha256"] = hashlib.sha256(b"PK\x03\x04 not a zip").hexdigest()
    (real / "gate.json").write_text(json.dumps(header))
    with pytest.raises(GateFileError, match="not a plain-number gate array file"):
        PatchGate.load(real)


def test_gate_drives_autopatcher_per_row(gate, model):
    tok = byte_tokenizer()
    questions = ["What is the capital of the country where the Colosseum is located?",
                 "Who founded the company that makes the iPhone?"]
    enc = tok([PROFILE.prompt_format.render(q) for q in questions], return_tensors="pt", padding=True)
    for threshold, expected in ((0.0, [True, True]), (1.01, [False, False])):
        patcher = AutoPatcher(model, tok, PROFILE, gate=replace(gate, threshold=threshold))
        patcher.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert [r.patched for r in patcher.last_report] == expected
        assert all(r.gate_score is not None and "P(patch helps)" in r.reason for r in patcher.last_report)
