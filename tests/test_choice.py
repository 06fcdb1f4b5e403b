"""The choosing gate: per row the candidate its rule picks (widest margin over per-member thresholds, else a
default), the rule tuned jointly on dev questions, persisted without pickle (version-1 files still load), and
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
from classifiers.choice import ChoiceGate, ChoiceRule, cross_validate_rule, tune_rule
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


# ---- the jointly tuned rule ----------------------------------------------------------------


def _accuracy(rule: ChoiceRule, scores, vanilla, patched) -> float:
    picks = rule.pick(scores)
    return float(np.mean([vanilla[i] if p is None else patched[p][i] for i, p in enumerate(picks)]))


def test_a_candidate_that_is_always_best_is_always_chosen():
    rng = np.random.default_rng(0)
    n = 60
    a = (rng.random(n) < 0.7).astype(float)
    vanilla = a * (rng.random(n) < 0.5)  # right only where `a` is right
    b = a * (rng.random(n) < 0.6)        # likewise: `a` is never worse than anything, on any row
    scores = {"b": rng.random(n), "a": rng.random(n)}  # uninformative scores: nothing to gain by choosing
    rule, report = tune_rule(scores, vanilla, {"b": b, "a": a})
    assert rule.default == "a" and rule.overrides == [] and report["policy"] == "always a"
    assert report["accuracy"] == pytest.approx(a.mean()) == pytest.approx(report["trivial"]["always a"])


def test_a_member_whose_scores_separate_perfectly_is_used():
    rng = np.random.default_rng(1)
    n = 40
    b_right = np.arange(n) >= n // 2
    a, b = (~b_right).astype(float), b_right.astype(float)     # exactly one candidate is right on each row
    scores = {"a": rng.random(n), "b": np.where(b_right, 0.8, 0.3) + rng.normal(0, 0.05, n)}
    rule, report = tune_rule(scores, np.zeros(n), {"a": a, "b": b})
    assert report["accuracy"] == 1.0 and max(report["trivial"].values()) == 0.5
    assert rule.default == "a" and rule.overrides == ["b"]     # the simplest rule that gets everything right
    assert rule.pick(scores) == ["b" if r else "a" for r in b_right]


def test_ties_go_to_the_simpler_policy_and_min_gain_guards_a_small_win():
    n = 20
    same = np.tile([1.0, 0.0], n // 2)
    scores = {"a": np.linspace(0, 1, n), "b": np.linspace(1, 0, n)}
    rule, report = tune_rule(scores, same, {"a": same, "b": same})  # every policy scores the same
    assert rule.default is None and rule.overrides == [] and report["policy"] == "never patch"
    a = same.copy()
    a[-1], a[0] = 1.0, 0.0  # `a` fixes the question where its score is highest and breaks the lowest: always-a ties
    rule, report = tune_rule(scores, same, {"a": a, "b": same})
    assert rule.default is None and rule.overrides == ["a"] and report["accuracy"] == same.mean() + 1 / n
    guarded, report = tune_rule(scores, same, {"a": a, "b": same}, min_gain=2)  # one question is not enough
    assert guarded.overrides == [] and guarded.default is None and report["accuracy"] == same.mean()


@pytest.mark.parametrize("seed", range(6))
def test_the_tuned_rule_is_never_below_a_trivial_policy_or_its_starting_rule_on_its_questions(seed):
    rng = np.random.default_rng(seed)
    n, names = 50, ["a", "b", "c"]
    vanilla = (rng.random(n) < 0.4).astype(float)
    patched = {m: (rng.random(n) < rng.uniform(0.3, 0.7)).astype(float) for m in names}
    scores = {m: rng.random(n) for m in names}
    start = ChoiceRule({m: float(rng.uniform(0, 0.5)) for m in names})
    rule, report = tune_rule(scores, vanilla, patched, grid=5, starts=[start])
    assert report["accuracy"] == pytest.approx(_accuracy(rule, scores, vanilla, patched))  # the report is the rule's
    assert report["accuracy"] >= max(report["trivial"].values()) - 1e-12
    assert report["accuracy"] >= _accuracy(start, scores, vanilla, patched) - 1e-12
    assert report["starts"][0]["accuracy"] == pytest.approx(_accuracy(start, scores, vanilla, patched))
    cv = cross_validate_rule(scores, vanilla, patched, grid=5)
    assert 0.0 <= cv["tuned"] <= 1.0 and 0.0 <= cv["best_trivial"] <= 1.0 and cv["folds"] == 5


def _tuned_choice(model) -> ChoiceGate:
    rule = ChoiceRule({"reroute": 0.9, "decompose": None}, default="decompose")
    return ChoiceGate({"reroute": _member(model, "reroute", [8.0, 0.0, 0.0], 0.5),
                       "decompose": _member(model, "decompose", [0.0, 1.0, 0.0], 0.5)}, {"dev": {"n": 3}}, rule)


def test_a_default_candidate_is_used_unless_another_member_overrides(model):
    gate = _tuned_choice(model)
    X = np.array([[0.9, -5.0, 0.0],   # reroute 0.999 >= 0.9 -> reroute
                  [0.1, 5.0, 0.0],    # reroute 0.69 < 0.9   -> the default, however confident decompose is
                  [-1.0, -5.0, 0.0]])  # nothing clears        -> the default, not "leave alone"
    assert gate.choose(X) == ["reroute", "decompose", "decompose"]
    assert gate.active_rule.describe() == "always decompose unless reroute >= 0.900"
    margins = gate.margins(X)
    assert np.all(np.isinf(margins["decompose"])) and margins["reroute"][0] > 0


def test_decisions_carry_the_chosen_profile_and_say_when_the_default_was_used(model, monkeypatch):
    from autopatch.gating import GateInput

    monkeypatch.setattr(FeatureSpec, "vector", lambda self, gate_input: gate_input.first_token_logits.numpy())
    rows = [[0.9, -5.0, 0.0], [0.1, 5.0, 0.0]]
    decisions = _tuned_choice(model).decide([GateInput(None, None, {}, torch.tensor(r, dtype=torch.float64)) for r in rows])
    assert [d.patch for d in decisions] == [True, True]
    assert [d.profile.strategy for d in decisions] == ["reroute", "decompose"]
    assert decisions[0].reason.startswith("choice gate: reroute (") and "decompose 0.007/off" in decisions[0].reason
    assert decisions[1].reason.startswith("choice gate: decompose (default: no other candidate clears its threshold)")


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tuning_on_almost_no_questions_does_not_fail(n):
    rng = np.random.default_rng(n)
    scores = {"a": rng.random(n), "b": rng.random(n)}
    outcomes = {"a": np.ones(n), "b": np.zeros(n)}
    rule, report = tune_rule(scores, np.zeros(n), outcomes)
    assert report["n"] == n and (rule.default == "a" or n == 0) and rule.overrides == []
    assert 0.0 <= cross_validate_rule(scores, np.zeros(n), outcomes)["tuned"] <= 1.0


def test_a_tuned_rule_round_trips_and_a_modified_rule_is_refused(model, tmp_path):
    gate = _tuned_choice(model)
    gate.save(tmp_path / "g")
    header = json.loads((tmp_path / "g" / "choice.json").read_text())
    assert header["version"] == 2 and header["rule"] == {"default": "decompose", "thresholds": {"reroute": 0.9, "decompose": None}}
    loaded = ChoiceGate.load(tmp_path / "g", model=model)
    assert loaded.rule == gate.rule and loaded.meta == {"dev": {"n": 3}}
    assert loaded.profile is loaded.members["decompose"].profile  # the default member's, not the first's
    X = np.random.default_rng(0).normal(size=(32, 3))
    assert loaded.choose(X) == gate.choose(X) and {"reroute", "decompose"} <= set(gate.choose(X))
    header["rule"]["thresholds"]["reroute"] = 0.1  # edited without its checksum
    (tmp_path / "g" / "choice.json").write_text(json.dumps(header))
    with pytest.raises(GateFileError, match="does not match its checksum"):
        ChoiceGate.load(tmp_path / "g", model=model)
    from classifiers.choice import _rule_digest

    for bad, problem in [({"default": "telepathy", "thresholds": {"reroute": 0.9, "decompose": None}}, "not a member"),
                         ({"default": None, "thresholds": {"reroute": 0.9}}, "not the members"),
                         ({"default": None, "thresholds": {"reroute": 2.0, "decompose": None}}, "probability")]:
        header["rule"], header["rule_sha256"] = bad, _rule_digest(bad)
        (tmp_path / "g" / "choice.json").write_text(json.dumps(header))
        with pytest.raises(GateFileError, match=problem):
            ChoiceGate.load(tmp_path / "g", model=model)


def test_a_version_1_file_loads_with_the_widest_margin_rule_it_was_written_for(model, tmp_path):
    gate = _choice(model, 0.4, 0.6)
    gate.save(tmp_path / "old")
    path = tmp_path / "old" / "choice.json"
    header = json.loads(path.read_text())
    old = {k: v for k, v in header.items() if k not in ("rule", "rule_sha256")} | {"version": 1}
    path.write_text(json.dumps(old))
    loaded = ChoiceGate.load(tmp_path / "old", model=model)
    assert loaded.rule is None and loaded.active_rule == ChoiceRule({"reroute": 0.4, "decompose": 0.6}, None)
    X = np.array([[0.9, 0.0, 0.0], [0.0, 4.0, 0.0], [-0.5, -3.0, 0.0]])
    assert loaded.choose(X) == ["reroute", "decompose", None]
    path.write_text(json.dumps(old | {"version": 3}))
    with pytest.raises(GateFileError, match="version 3 is not supported.*retrain"):
        ChoiceGate.load(tmp_path / "old", model=model)


def test_the_shipped_version_1_choice_gate_still_loads():
    from classifiers import SHIPPED_DIR

    gate = ChoiceGate.load(SHIPPED_DIR / "qwen2.5-coder-0.5b-instruct")  # no model: the file checks only
    assert set(gate.members) == {"verbalize", "reroute", "decompose"}
    assert set(gate.active_rule.thresholds) == set(gate.members)


def test_retune_reads_the_cached_dev_labels_and_features_and_needs_no_model(model, tmp_path):
    from classifiers.train import retune_choice_gate
    from eval.sweep import SweepConfig

    rng = np.random.default_rng(3)
    gate = _choice(model, 0.5, 0.5)
    gate.meta = {"dev_sources": "twohop:dev:40"}
    out = gate.save(tmp_path / "run")
    n = 40
    ids = [f"q{i}" for i in range(n)]
    X = rng.normal(size=(n, 3))
    np.savez(out / "features_twohop_dev.npz", ids=np.array(ids), X=X)
    reroute_right = X[:, 0] > 0.5  # reroute is right exactly where its own score is high; decompose never is
    vanilla_right = X[:, 0] < -0.5  # and vanilla elsewhere, part of the time: only a threshold gets both
    for name, right in (("reroute", reroute_right), ("decompose", np.zeros(n, bool))):
        p = gate.members[name].profile
        key = SweepConfig(p.strategy, p.source_position, p.source_layer, p.target_layer, p.bridge_prompt, p.scale).key
        rows = [{"config": "vanilla", "id": i, "em": float(v)} for i, v in zip(ids, vanilla_right)]
        rows += [{"config": key, "id": i, "em": float(r)} for i, r in zip(ids, right)]
        (out / name).mkdir(exist_ok=True)
        (out / name / "labels_twohop_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tuned = retune_choice_gate(out, grid=n)  # a grid step per question
    dev = tuned.meta["dev"]
    assert dev["choice_accuracy"] == pytest.approx((reroute_right | vanilla_right).mean()) and dev["n"] == n
    assert dev["trivial"]["never patch"] == pytest.approx(vanilla_right.mean())
    assert dev["always"]["reroute"] == pytest.approx(reroute_right.mean()) and dev["chosen"]["reroute"] == reroute_right.sum()
    assert tuned.rule is not None and tuned.rule.default is None and tuned.rule.overrides == ["reroute"]
    assert {"policy", "rule", "widest_margin_accuracy", "cv", "chosen", "note"} <= set(dev)
    assert ChoiceGate.load(out, model=model).rule == tuned.rule  # saved
