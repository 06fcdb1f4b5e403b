"""Cross-model patching: the attached source's state at the same token, mapped, replaces the target's own; the map
is fitted by ridge regression, saved without pickle, and refused when it does not belong to the models."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from autopatch.crossmodel import StateMap, attach, attached, detach, fit_state_map, paired_states
from autopatch.errors import ConfigError
from autopatch.fingerprint import model_fingerprint
from autopatch.gating import AlwaysPatch
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from autopatch.registry import STRATEGIES, standalone_strategies
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FMT = PromptFormat(demonstrations=())
QUESTIONS = ["What is the capital of the country where the Colosseum is located?",
             "Who founded the company that makes the iPhone?"]
PROMPTS = [FMT.render(q) for q in QUESTIONS + ["Who wrote the book that the film was based on?",
                                               "What is the language of the country where Tango began?",
                                               "Which river runs through the city where Mozart was born?",
                                               "Who is the mayor of the city where the Louvre is?"]]


@pytest.fixture(scope="module")
def models():
    return tiny_model_for_bytes("llama", seed=1), tiny_model_for_bytes("llama", seed=2), byte_tokenizer()


def identity_map(model, layer: int) -> StateMap:
    hidden = model.config.hidden_size
    return StateMap(np.eye(hidden, dtype=np.float32), np.zeros(hidden, np.float32), layer, layer,
                    model_fingerprint(model), model_fingerprint(model))


def answers(model, tok, profile):
    enc = tok([FMT.render(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    patcher = AutoPatcher(model, tok, profile, gate=AlwaysPatch())
    return patcher.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0).tolist()


def test_a_model_patched_from_itself_through_the_identity_map_answers_as_reroute(models):
    model, _, tok = models
    reroute = PatchProfile(strategy="reroute", source_layer=2, target_layer=1, prompt_format=FMT)
    attach(model, model, identity_map(model, 2))
    try:
        assert attached(model) is not None
        assert answers(model, tok, replace(reroute, strategy="cross-model")) == answers(model, tok, reroute)
    finally:
        detach(model)


def test_another_source_changes_the_patch_and_the_map_is_applied(models):
    target, source, tok = models
    reroute = PatchProfile(strategy="reroute", source_layer=2, target_layer=1, prompt_format=FMT)
    state_map = fit_state_map(source, target, tok, PROMPTS, source_layer=1, target_layer=2, last=16)
    attach(target, source, state_map)
    try:
        crossed = AutoPatcher(target, tok, replace(reroute, strategy="cross-model"), gate=AlwaysPatch())
        own = AutoPatcher(target, tok, reroute, gate=AlwaysPatch())
        results = [p.generate_with_reports(**tok([FMT.render(QUESTIONS[0])], return_tensors="pt"), max_new_tokens=2,
                                           do_sample=False, pad_token_id=0, questions=QUESTIONS[:1])
                   for p in (crossed, own)]
        (_, _, theirs), (_, _, mine) = results[0].targets[0].edits[0], results[1].targets[0].edits[0]
        assert not torch.allclose(theirs, mine)  # the source's state, not the target's own
        assert results[0].targets[0].input_ids.tolist() == results[1].targets[0].input_ids.tolist()  # reroute's prompt
    finally:
        detach(target)


def test_the_ridge_fit_recovers_an_exact_linear_relation_and_chooses_its_penalty_on_held_out_prompts(models):
    model, _, tok = models
    state_map = fit_state_map(model, model, tok, PROMPTS, source_layer=2, target_layer=2, last=16,
                              alphas=(1e-6, 1.0))
    assert state_map.meta["alpha"] == 1e-6 and state_map.meta["held_out_r2"] > 0.999
    rows = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS[:2]]
    X, Y = paired_states(model, model, rows, source_layer=2, target_layer=2, last=8)
    assert np.allclose(X, Y) and np.allclose(state_map.apply(torch.from_numpy(X)).numpy(), Y, atol=1e-3)


def test_a_saved_map_loads_back_and_is_refused_when_tampered_with_or_for_other_models(models, tmp_path):
    target, source, tok = models
    state_map = StateMap(np.full((32, 32), 0.5, np.float32), np.arange(32, dtype=np.float32), 1, 2,
                         model_fingerprint(source), model_fingerprint(target), {"note": "test"})
    state_map.save(tmp_path / "m")
    back = StateMap.load(tmp_path / "m", source=source, target=target)
    assert np.array_equal(back.weight, state_map.weight) and back.meta == {"note": "test"}
    with pytest.raises(ConfigError, match="another target model"):
        StateMap.load(tmp_path / "m", source=source, target=source)
    with pytest.raises(ConfigError, match="another source model"):
        attach(target, target, back)
    header = json.loads((tmp_path / "m" / "map.json").read_text())
    blob = bytearray((tmp_path / "m" / "map.npz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one byte of the arrays changed
    (tmp_path / "m" / "map.npz").write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="checksum"):
        StateMap.load(tmp_path / "m")
    assert header["format"] == "autopatch-state-map"


def test_without_a_source_or_at_another_layer_the_strategy_is_refused_with_what_to_do(models):
    model, _, tok = models
    profile = PatchProfile(strategy="cross-model", source_layer=2, target_layer=1, prompt_format=FMT)
    with pytest.raises(ConfigError, match="needs a source model"):
        answers(model, tok, profile)
    attach(model, model, identity_map(model, 3))
    try:
        with pytest.raises(ConfigError, match="imitates layer 3"):
            answers(model, tok, profile)
    finally:
        detach(model)


def test_cross_model_is_registered_but_offered_only_where_a_second_model_can_be_attached():
    from server.schemas import AutopatchOptions

    assert "cross-model" in STRATEGIES and STRATEGIES["cross-model"].needs_source_model
    assert "cross-model" not in standalone_strategies() and "reroute" in standalone_strategies()
    from eval.methods import default_methods

    assert "cross-model" not in default_methods()
    with pytest.raises(ValueError):
        AutopatchOptions(strategy="cross-model")


def test_the_harness_runs_cross_model_from_an_attached_source_and_refuses_it_without_one(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from autopatch.cli import main
    from eval.runner import read_results

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    layer = PatchProfile.default_for(model).source_layer  # the profile the harness falls back to reads this layer
    identity_map(model, layer).save(tmp_path / "map")
    base = ["eval", "--dataset", "twohop", "--limit", "4", "--model", str(tiny_dir), "--budget", "3", "--no-hops",
            "--no-gold-scores", "--quiet", "--methods", "vanilla,reroute,cross-model"]
    assert main([*base, "--out", str(tmp_path / "refused")]) == 2
    assert "pass --source-model" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "run"), "--source-model", str(tiny_dir), "--state-map",
                 str(tmp_path / "map")]) == 0
    lines = {(r["method"], r["id"]): r for r in read_results(tmp_path / "run")}
    ids = {i for _, i in lines}
    assert len(ids) == 4 and all(lines[("cross-model", i)]["report"]["patched"] for i in ids)
    # a model patched from an identical copy of itself through the identity map answers exactly as reroute
    assert all(lines[("cross-model", i)]["continuation"] == lines[("reroute", i)]["continuation"] for i in ids)
