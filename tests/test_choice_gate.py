"""The choosing gate: per row the candidate strategy with the widest margin, persisted without pickle, and
AutoPatcher patching each row with the strategy chosen for it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autopatch.errors import GateFileError
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from classifiers import load_gate_dir
from classifiers.choice import ChoiceGate
from classifiers.features import FeatureSpec
from classifiers.gate import PatchGate, model_fingerprint
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FMT = PromptFormat(demonstrations=())
SPEC = FeatureSpec(layers=(1,), positions=("span_end",), use_states=False, use_scalars=True)  # 3 scalar features


@pytest.fixture(scope="module")
def model():
    return tiny_model_for_bytes("llama", seed=2)


def _member(model, strategy: str, weights, threshold: float, **profile) -> PatchGate:
    """A gate whose logit is ``weights . scalars``: scaling and PCA are the identity."""
    arrays = {"scaler_mean": np.zeros(3), "scaler_scale": np.ones(3), "pca_mean": np.zeros(3),
              "pca_components": np.eye(3), "coef": np.asarray(weights, float), "intercept": np.zeros(1)}
    prof = PatchProfile(strategy=strategy, source_layer=2, target_layer=1, prompt_format=FMT, **profile)
    return PatchGate(arrays, threshold, SPEC, prof, model_fingerprint(model), {})


def _choice(model, reroute_threshold=0.5, decompose_threshold=0.5) -> ChoiceGate:
    # first-token probability pushes towards reroute, entropy towards decompose
    return ChoiceGate({"reroute": _member(model, "reroute", [8.0, 0.0, 0.0], reroute_threshold),
                       "decompose": _member(model, "decompose", [0.0, 1.0, 0.0], decompose_threshold)})


def test_the_widest_margin_wins_and_nothing_clears_means_leave_alone(model):
    gate = _choice(model)
    X = np.array([[0.9, 0.0, 0.0],    # reroute 0.999, decompose 0.5  -> reroute
                  [0.0, 4.0, 0.0],    # reroute 0.5,   decompose 0.98 -> decompose
                  [-0.5, -3.0, 0.0]])  # both below threshold       -> leave alone
    assert gate.choose(X) == ["reroute", "decompose", None]
    assert gate.feature_layers == (1, 2)  # the features' layer and the members' source layer


def test_autopatcher_patches_each_row_with_the_strategy_chosen_for_it(model):
    tok = byte_tokenizer()
    questions = ["What is the capital of the country where the Colosseum is located?",
                 "Who founded the company that makes the iPhone?"]
    probe = AutoPatcher(model, tok, PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT))
    enc = probe.encode(questions)
    logits = model(**enc).logits[:, -1]
    probs = torch.softmax(logits.float(), -1).max(-1).values
    # thresholds between the two rows' first-token probabilities: the likelier row goes to reroute
    hi, lo = int(probs.argmax()), int(probs.argmin())
    mid = float(probs.mean())
    gate = ChoiceGate({"reroute": _member(model, "reroute", [8.0, 0.0, 0.0], 1 / (1 + np.exp(-8 * mid))),
                       "decompose": _member(model, "decompose", [0.0, 0.0, 0.0], 0.5)})  # always 0.5: margin 0
    patcher = AutoPatcher(model, tok, gate=gate)
    result = patcher.generate_with_reports(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0, questions=questions)
    reports = result.reports
    assert reports[hi].patched and reports[hi].strategy == "reroute" and result.targets[hi].edits
    assert reports[lo].patched and reports[lo].strategy == "decompose" and not result.targets[lo].edits
    assert "choice gate: reroute" in reports[hi].reason and "choice gate: decompose" in reports[lo].reason


def test_save_load_round_trip_and_refusals(model, tmp_path):
    gate = _choice(model, 0.4, 0.6)
    gate.save(tmp_path / "g")
    loaded = load_gate_dir(tmp_path / "g", model=model)
    assert isinstance(loaded, ChoiceGate) and list(loaded.members) == ["reroute", "decompose"]
    assert loaded.members["decompose"].threshold == 0.6 and loaded.members["reroute"].profile.strategy == "reroute"
    X = np.random.default_rng(0).normal(size=(5, 3))
    assert loaded.choose(X) == gate.choose(X)
    # a member rewritten with a fresh checksum of its own is still caught by choice.json's digest
    member = tmp_path / "g" / "reroute" / "gate.json"
    header = json.loads(member.read_text())
    header["threshold"] = 0.0
    member.write_text(json.dumps(header))
    with pytest.raises(GateFileError, match="does not match the checksum in choice.json"):
        ChoiceGate.load(tmp_path / "g", model=model)
    header_path = tmp_path / "g" / "choice.json"
    bad = json.loads(header_path.read_text())
    bad["members"] = ["../escape"]
    header_path.write_text(json.dumps(bad))
    with pytest.raises(GateFileError, match="invalid member"):
        ChoiceGate.load(tmp_path / "g", model=model)
    with pytest.raises(GateFileError, match="another model"):
        _choice(model).save(tmp_path / "h")
        ChoiceGate.load(tmp_path / "h", model=tiny_model_for_bytes("qwen2"))


def test_members_must_read_the_same_features(model):
    other = _member(model, "decompose", [0, 0, 0], 0.5)
    other.spec = FeatureSpec(layers=(2,), positions=("last",), use_states=False, use_scalars=True)
    with pytest.raises(GateFileError, match="same features"):
        ChoiceGate({"reroute": _member(model, "reroute", [1, 0, 0], 0.5), "decompose": other})
