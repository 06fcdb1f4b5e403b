"""The engine on the real embedded Gemma 3 270M (loaded once per session, from the cache)."""

from __future__ import annotations

import pytest
import torch

from autopatch.architectures import decoder_layers, final_norm, num_layers, unembedding
from autopatch.engine import PatchEdit, capture, patch
from autopatch.patchscope import decode_state, describe_state

pytestmark = pytest.mark.gemma
torch.set_grad_enabled(False)


def test_embedded_model_is_gemma3_with_18_layers(gemma):
    model, tok = gemma
    assert model.config.model_type == "gemma3_text"
    assert num_layers(model) == 18 and model.config.hidden_size == 640
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_self_patch_is_identity_and_last_layer_matches_by_hand(gemma):
    model, tok = gemma
    enc = tok("The Eiffel Tower is in the city of", return_tensors="pt")
    reference = model(**enc).logits
    with capture(model, layers=[5]) as cap:
        model(**enc)
    n = enc.input_ids.shape[1]
    with patch(model, [PatchEdit(5, 0, p, cap.states[5][0, p]) for p in range(n)]):
        torch.testing.assert_close(model(**enc).logits, reference, atol=1e-4, rtol=1e-4)
    vector = cap.states[5][0, -1] * 2
    with patch(model, [PatchEdit(num_layers(model) - 1, 0, -1, vector)]):
        logits = model(**enc).logits[0, -1]
    torch.testing.assert_close(logits, unembedding(model)(final_norm(model)(vector[None, None]))[0, 0], atol=1e-3, rtol=1e-4)


def test_decode_steps_untouched_and_padded_batch_equals_single(gemma):
    """In float32 activations a padded row's scores are its lone scores to rounding; in a mode whose matmuls round
    their inputs (the defaults with a bfloat16 prefill or int8 activations) attention's last-bit differences can
    become visible, so the comparison runs batch-invariant there, and is exact."""
    from autopatch.invariance import set_batch_invariant

    model, tok = gemma
    prompts = ["Q: What is the capital of France?\nA:", "The Colosseum is in"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    vector = torch.randn(model.config.hidden_size) * 20
    calls = []
    edits = [PatchEdit(3, row, 1, vector, fn=lambda v: calls.append(1) or v) for row in range(2)]
    exact = set_batch_invariant(model)
    try:
        with patch(model, edits, attention_mask=batch.attention_mask):
            batched = model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
        assert len(calls) == 2  # one per edit, prefill only
        for row, prompt in enumerate(prompts):
            single_enc = tok(prompt, return_tensors="pt")
            with patch(model, [PatchEdit(3, 0, 1, vector)]):
                single = model.generate(**single_enc, max_new_tokens=4, do_sample=False, output_scores=True,
                                        return_dict_in_generate=True)
            tolerance = {"atol": 0.0, "rtol": 0.0} if exact else {"atol": 2e-3, "rtol": 1e-3}
            torch.testing.assert_close(batched.scores[0][row], single.scores[0][0], **tolerance)
    finally:
        set_batch_invariant(model, on=False)


def test_hooks_removed_after_exception(gemma):
    model, tok = gemma
    before = sum(len(b._forward_hooks) for b in decoder_layers(model))
    with pytest.raises(ValueError):
        with capture(model, layers=[1]), patch(model, [PatchEdit(2, 0, 0, torch.zeros(640))]):
            raise ValueError("boom")
    assert sum(len(b._forward_hooks) for b in decoder_layers(model)) == before


def test_token_identity_patchscope_reads_back_a_word(gemma):
    model, tok = gemma
    enc = tok("I visited Paris", return_tensors="pt")
    with capture(model, layers=[2], positions=[-1]) as cap:
        model(**enc)
    top = decode_state(model, tok, cap.states[2][0, 0], layer=2, k=3)
    assert top[0][0].strip() == "Paris"
    assert describe_state(model, tok, cap.states[2][0, 0], layer=2, max_new_tokens=2).strip().startswith("Paris")


def test_autopatcher_without_patching_is_model_generate(gemma):
    from autopatch.gating import NeverPatch
    from autopatch.patcher import AutoPatcher

    model, tok = gemma
    patcher = AutoPatcher(model, tok, gate=NeverPatch())
    fmt = patcher.profile.prompt_format
    prompts = [fmt.render(q, tok) for q in ("What is the capital of the country where the Colosseum is located?",
                                           "Who founded the company that makes the iPhone?", "What is 2+2?")]
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(patcher.generate(**enc, **kwargs), model.generate(**enc, **kwargs))
    assert torch.equal(patcher.generate(**enc, **kwargs, patching=False), model.generate(**enc, **kwargs))


def test_verbalize_span_patchscope_decodes_the_bridge_from_the_subject_state(gemma):
    from dataclasses import replace

    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import PatchProfile

    model, tok = gemma
    profile = replace(PatchProfile.shipped_for(model), strategy="verbalize", bridge_prompt="span",
                      source_position="subject_end", source_layer=3, target_layer=3)
    question = "What is the capital of the country where the Colosseum is located?"
    enc = tok([profile.prompt_format.render(question, tok)], return_tensors="pt")
    for control, expect_italy in ((None, True), ("nopatch", False), ("zero", False)):
        patcher = AutoPatcher(model, tok, profile, gate=AlwaysPatch(), control=control)
        patcher.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        report = patcher.last_report[0]
        assert report.patched
        assert ("Italy" in report.bridge) == expect_italy, (control, report.bridge)


def test_the_shipped_gate_and_profile_load_without_pickle_and_drive_autopatcher(gemma):
    from autopatch.patcher import AutoPatcher
    from classifiers import default_gate_for
    from classifiers.choice import ChoiceGate
    from classifiers.screen import ScreenedGate

    model, tok = gemma
    gate = default_gate_for(model)  # the choosing gate, behind the two-hop screen shipped beside it
    assert isinstance(gate, ScreenedGate) and isinstance(gate.inner, ChoiceGate)
    assert set(gate.inner.members) == {"verbalize", "decompose"}
    patcher = AutoPatcher(model, tok)
    assert patcher.gate is not None and isinstance(patcher.gate, ScreenedGate)
    assert patcher.profile.strategy == "verbalize" and patcher.profile.note.startswith("sweep")
    assert (patcher.resolution.profile_source, patcher.resolution.gate_source) == ("shipped", "shipped")
    question = "What is the capital of the country where the Colosseum is located?"
    enc = tok([patcher.profile.prompt_format.render(question, tok)], return_tensors="pt")
    patcher.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    report = patcher.last_report[0]
    assert report.located and report.gate_score is not None and 0.0 <= report.gate_score <= 1.0
    assert report.reason.startswith("screen: P(two-hop question)=") and ">=" in report.reason.split(";")[0]
    (request,) = patcher.answer("Write a Python function that returns the n-th Fibonacci number.")
    # left alone: the locator no longer reads a long-form request (autopatch/locate/reach.py), before any screen
    assert not request.report.located and not request.report.patched and "long-form" in request.report.reason


@pytest.mark.gemma
def test_generate_strategy_backpatch_uses_the_shipped_backpatch_profile(gemma):
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import strategy_profile

    model, tok = gemma
    profile, swept = strategy_profile(model, "backpatch", AutoPatcher(model, tok).profile)
    assert swept and profile.strategy == "backpatch" and profile.target_layer < profile.source_layer
    AutoPatcher(model, tok, profile)  # valid for this model: the CLI path no longer fails


def test_answer_on_gemma_is_short_and_reported(gemma):
    from autopatch.patcher import AutoPatcher

    model, tok = gemma
    (answer,) = AutoPatcher(model, tok).answer("What is the capital of the country where the Colosseum is located?",
                                               max_new_tokens=12)
    assert answer.text and "\n" not in answer.text and "Q:" not in answer.text
    assert answer.report.located and answer.report.gate_score is not None


@pytest.mark.parametrize("strategy", ["verbalize", "reroute", "decompose"])
def test_the_cached_prefix_gives_the_uncached_tokens_on_gemma(gemma, strategy):
    """Exact with float32 activations. Under a bfloat16 prefill a token computed in the cached prefix's forward pass
    and the same token computed in the whole prompt's are different attention calls, and bfloat16's rounding can
    magnify their last-bit difference (docs/runs/quant_gemma_int4bf16: one answer of 300 moved); there the cache
    is batch-invariant instead (a row splits at the registered format start, alone or batched: test_prefix_cache)."""
    from dataclasses import replace

    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.quantize import QUANT_MODES, apply_mode, model_quantization
    from eval.twohop import generate_twohop

    model, tok = gemma
    loaded = QUANT_MODES[model_quantization(model)]
    questions = [r.question for r in generate_twohop("dev")[:8]]
    outputs = []
    apply_mode(model, QUANT_MODES[loaded.cache_name])  # the same weights, float32 activations
    try:
        for reuse in (False, True):
            patcher = AutoPatcher(model, tok, gate=AlwaysPatch(), reuse_prefix=reuse)
            patcher.profile = replace(patcher.profile, strategy=strategy)
            enc = patcher.encode(questions)
            result = patcher.generate_with_reports(**enc, max_new_tokens=8, do_sample=False, questions=questions)
            outputs.append((result.output, [r.bridge for r in result.reports]))
    finally:
        apply_mode(model, loaded)
    assert torch.equal(outputs[0][0], outputs[1][0]) and outputs[0][1] == outputs[1][1]


def test_the_first_load_straight_from_gguf_equals_the_float32_route_bit_for_bit(gemma, tmp_path, monkeypatch):
    """autopatch.gguf_quantized builds the int4 model from the GGUF file with no float32 copy; it must be the model
    the float32 cache and quantize_model give: every parameter and buffer, the generation config, the answers."""
    import autopatch
    from autopatch import gguf_quantized, loading
    from autopatch.models import embedded_model
    from autopatch.quantize import check_mode, model_quantization, quantize_model

    spec = embedded_model("gemma-3-270m")
    monkeypatch.setenv("AUTOPATCH_QUANTIZED_CACHE", str(tmp_path))
    steps: list[str] = []
    direct, tok = gguf_quantized.load_or_build(spec, check_mode("int4"), lambda: loading._assemble_gguf(spec, print),
                                               progress=steps.append)
    assert len(steps) == 2 and "without a float32 copy" in steps[1]  # built here, not read from a cache
    monkeypatch.delenv("AUTOPATCH_QUANTIZED_CACHE")
    reference, _ = autopatch.load_model(quantize="none")
    quantize_model(reference, "int4")  # in memory: the float32 route's model
    ours, theirs = direct.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs) and model_quantization(direct) == "int4"
    assert [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])] == []
    assert direct.generation_config.to_dict() == reference.generation_config.to_dict()
    enc = tok(["The Colosseum is in the city of", "Paris is the capital of"], return_tensors="pt", padding=True)
    assert torch.equal(direct.generate(**enc, max_new_tokens=6, do_sample=False),
                       reference.generate(**enc, max_new_tokens=6, do_sample=False))

    monkeypatch.setenv("AUTOPATCH_QUANTIZED_CACHE", str(tmp_path))  # int4-bf16 shares int4's cache: nothing built
    monkeypatch.setattr(autopatch.kernels, "fast_bfloat16", lambda: True)
    fast, _ = gguf_quantized.load_or_build(spec, check_mode("int4-bf16"), lambda: pytest.fail("rebuilt"))
    assert model_quantization(fast) == "int4-bf16" and model_quantization(direct) == "int4"
    assert [k for k, v in fast.state_dict().items() if not torch.equal(v, ours[k])] == []


def test_batch_invariant_a_batched_answer_is_its_lone_answer_bit_for_bit(gemma, monkeypatch):
    """autopatch.invariance.set_batch_invariant (the bfloat16 GEMM's fixed blocks, the row-invariant attention): a
    row's forward passes do not depend on its batch, so each row's greedy tokens and every step's scores equal its
    own run alone (without it, 4 answers of 32 moved in bench/bench_server.py). The shared model is the machine's
    default: a bfloat16-prefill mode, or on an AVX2 machine int8 activations; where it multiplies float32
    activations the switch does nothing, and the bfloat16-prefill mode is loaded instead (from int4's cache; torch
    emulates its bfloat16 GEMM there), so the machinery runs everywhere."""
    import autopatch
    from autopatch.invariance import set_batch_invariant
    from autopatch.patcher import AutoPatcher
    from eval.twohop import generate_twohop

    model, tok = gemma
    if not set_batch_invariant(model):
        assert not autopatch.kernels.fast_bfloat16()
        monkeypatch.setattr(autopatch.kernels, "fast_bfloat16", lambda: True)
        model, tok = autopatch.load_model(quantize="int4-bf16")
        assert set_batch_invariant(model)
    try:
        patcher = AutoPatcher(model, tok)
        questions = [r.question for r in generate_twohop("dev")[8:16]]
        kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
        batched = model.generate(**patcher.encode(questions), **kwargs)
        width = patcher.encode(questions)["input_ids"].shape[1]
        for row, question in enumerate(questions):
            enc = patcher.encode([question])
            alone = model.generate(**enc, **kwargs)
            start = enc["input_ids"].shape[1]
            steps = alone.sequences.shape[1] - start
            assert torch.equal(batched.sequences[row, width : width + steps], alone.sequences[0, start:])
            assert all(torch.equal(batched.scores[s][row], alone.scores[s][0]) for s in range(steps))
    finally:
        set_batch_invariant(model, on=False)
