"""The model's own decomposition (self-ask style): its prompt in the model's format, a strict parser, and the
locator aligning a proposal with the question exactly as it aligns a gold decomposition."""

from __future__ import annotations

import pytest
import torch

from autopatch.decomposer import DECOMPOSE_EXAMPLES, decomposition_prompt, parse_decomposition, propose_decompositions
from autopatch.locate import locate
from autopatch.prompts import PromptFormat
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("text, expected", [
    (" What is the largest country in Africa?\nStep 2: What is the capital of #1?\n",
     [{"question": "What is the largest country in Africa?"}, {"question": "What is the capital of #1?"}]),
    (" none", None),
    (" None.\nStep 2: What is #1?", None),
    (" What is the largest country?", None),                           # no second step
    (" What is the largest country?\nStep 2: What is its capital?", None),  # no #1
    (" Who is #1?\nStep 2: Who is #1?", None),                          # #1 in the first step
    (" What is it?\nStep 2: #1?", None),                                # nothing asked of #1
    (" In which year did it sink?\nStep 2: Who won in #1?\nQuestion: more", [{"question": "In which year did it sink?"},
                                                                            {"question": "Who won in #1?"}]),
])
def test_the_parser_takes_two_steps_with_1_in_the_second_and_nothing_else(text, expected):
    assert parse_decomposition(text) == expected


def test_a_proposal_aligns_with_the_question_like_a_gold_decomposition():
    steps = parse_decomposition(" What is the largest country in South America?\nStep 2: What is the capital of #1?")
    loc = locate("What is the capital of the largest country in South America?", steps)
    assert loc.method == "decomposition" and loc.span == "the largest country in South America"
    assert loc.fill("Brazil") == "What is the capital of Brazil?"


def test_the_prompt_ends_where_the_first_step_is_written_in_either_format():
    tok = byte_tokenizer()
    base = decomposition_prompt(PromptFormat(), tok, "Who is the spouse of the Green performer?")
    assert base.endswith("Question: Who is the spouse of the Green performer?\nStep 1:")
    assert all(q in base for q, _, _ in DECOMPOSE_EXAMPLES) and "Step 1: none" in base


def test_proposals_come_from_one_batched_generation_and_are_parsed_or_none():
    model, tok = tiny_model_for_bytes("llama", seed=4), byte_tokenizer()
    questions = ["What is the capital of the largest country in Africa?", "Write a poem."]
    proposals = propose_decompositions(model, tok, PromptFormat(), questions, max_new_tokens=6)
    assert len(proposals) == 2 and all(p is None or (len(p) == 2 and "#1" in p[1]["question"]) for p in proposals)
    assert propose_decompositions(model, tok, PromptFormat(), []) == []


def test_the_patcher_asks_the_model_only_where_the_grammar_reads_nothing(monkeypatch):
    import autopatch.decomposer as decomposer
    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import PatchProfile

    asked: list[str] = []

    def fake(model, tok, fmt, questions, **kwargs):
        asked.extend(questions)
        steps = [{"question": "What is the tallest mountain in Africa?"}, {"question": "In which country is #1?"}]
        return [(steps, 7) for _ in questions]

    monkeypatch.setattr(decomposer, "propose_decompositions_counted", fake)
    model, tok = tiny_model_for_bytes("llama", seed=4), byte_tokenizer()
    fmt = PromptFormat(demonstrations=())
    questions = ["What is the capital of the country where the Colosseum is located?",  # the grammar reads it
                 "In which country is the tallest mountain in Africa?"]                # the grammar does not
    profile = PatchProfile(strategy="decompose", source_layer=1, target_layer=1, prompt_format=fmt)
    grammar = AutoPatcher(model, tok, profile, gate=AlwaysPatch())
    enc = grammar.encode(questions)
    plain = grammar.generate_with_reports(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0, questions=questions)
    assert [r.located for r in plain.reports] == [True, False] and not asked
    both = AutoPatcher(model, tok, profile, gate=AlwaysPatch(), decomposer="both")
    result = both.generate_with_reports(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0, questions=questions)
    assert asked == [questions[1]]
    assert [r.located for r in result.reports] == [True, True]
    assert result.reports[1].location["span"] == "the tallest mountain in Africa"
    assert [r.proposal_tokens for r in result.reports] == [0, 7]
    assert result.reports[0].to_dict() | {"answer": None} == plain.reports[0].to_dict() | {"answer": None}
    with pytest.raises(Exception, match="Unknown decomposer"):
        AutoPatcher(model, tok, profile, decomposer="oracle")


def _screened_patchers(model, tok, profile, screen):
    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from classifiers.screen import ScreenedGate

    gate = ScreenedGate(screen, AlwaysPatch())
    return (AutoPatcher(model, tok, profile, gate=gate, decomposer="model"),
            AutoPatcher(model, tok, profile, gate=gate, decomposer="grammar"))


def _scalar_screen(model, weights, threshold, fmt):
    """A screen on the first-token scalars only (it reads no located state), logit ``weights . scalars``."""
    import numpy as np

    from autopatch.profile import PatchProfile
    from classifiers.features import FeatureSpec
    from classifiers.gate import PatchGate, model_fingerprint

    arrays = {"scaler_mean": np.zeros(3), "scaler_scale": np.ones(3), "pca_mean": np.zeros(3),
              "pca_components": np.eye(3), "coef": np.asarray(weights, float), "intercept": np.zeros(1)}
    spec = FeatureSpec(layers=(1,), positions=("last",), use_states=False, use_scalars=True)
    return PatchGate(arrays, threshold, spec, PatchProfile(source_layer=1, target_layer=1, prompt_format=fmt),
                     model_fingerprint(model), {"kind": "screen"})


PROPOSED = [{"question": "What is the tallest mountain in Africa?"}, {"question": "In which country is #1?"}]
SCREENED_QUESTIONS = ["In which country is the tallest mountain in Africa?",
                      "What is the capital of the country where the Colosseum is located?"]


@pytest.fixture
def asked(monkeypatch):
    import autopatch.decomposer as decomposer

    questions: list[str] = []

    def fake(model, tok, fmt, qs, **kwargs):
        questions.extend(qs)
        return [(PROPOSED if "Africa" in q else None, 5) for q in qs]

    monkeypatch.setattr(decomposer, "propose_decompositions_counted", fake)
    return questions


def test_rows_the_screen_turns_away_cost_no_proposal_and_answer_as_the_grammar_does(asked):
    from autopatch.profile import PatchProfile

    model, tok, fmt = tiny_model_for_bytes("llama", seed=4), byte_tokenizer(), PromptFormat(demonstrations=())
    profile = PatchProfile(source_layer=1, target_layer=1, prompt_format=fmt)
    model_reader, grammar = _screened_patchers(model, tok, profile, _scalar_screen(model, [0.0, 0.0, 0.0], 0.9, fmt))
    enc = grammar.encode(SCREENED_QUESTIONS)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, questions=SCREENED_QUESTIONS)
    result = model_reader.generate_with_reports(**enc, **kwargs)
    assert asked == []  # the screen turned both away before any proposal
    assert torch.equal(result.output, grammar.generate_with_reports(**enc, **kwargs).output)
    assert [(r.screen_passed, r.proposal_tokens, r.patched) for r in result.reports] == [(False, 0, False)] * 2


@pytest.mark.parametrize("strategy,demonstrations", [("reroute", ()), ("decompose", ()), ("reroute", None)])
def test_a_passed_row_is_proposed_after_the_screen_and_patched_as_if_proposed_first(asked, monkeypatch, strategy,
                                                                                    demonstrations):
    import numpy as np

    import autopatch.patcher
    from autopatch.profile import PatchProfile

    # with demonstrations, the prompts share a cached prefix and the captured positions are shifted into its layout
    fmt = PromptFormat() if demonstrations is None else PromptFormat(demonstrations=demonstrations)
    model, tok = tiny_model_for_bytes("llama", seed=4), byte_tokenizer()
    profile = PatchProfile(strategy=strategy, source_position="subject_end", source_layer=1, target_layer=1,
                           prompt_format=fmt)
    probe, _ = _screened_patchers(model, tok, profile, _scalar_screen(model, [0.0, 0.0, 0.0], 0.9, fmt))
    enc = probe.encode(SCREENED_QUESTIONS)
    probs = torch.softmax(model(**enc).logits[:, -1].float(), -1).max(-1).values
    sign = 1.0 if float(probs[0]) > float(probs[1]) else -1.0  # the screen passes row 0 (the proposal's row) only
    threshold = 1 / (1 + np.exp(-sign * 8 * float(probs.mean())))
    screen = _scalar_screen(model, [sign * 8.0, 0.0, 0.0], threshold, fmt)
    model_reader, _ = _screened_patchers(model, tok, profile, screen)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, questions=SCREENED_QUESTIONS)
    after = model_reader.generate_with_reports(**enc, **kwargs)
    assert asked == SCREENED_QUESTIONS[:1]
    assert [r.screen_passed for r in after.reports] == [True, False] and after.reports[0].patched
    assert after.reports[0].location["span"] == "the tallest mountain in Africa"
    asked.clear()
    monkeypatch.setattr(autopatch.patcher, "screens_before_proposals", lambda gate: False)  # propose first
    first = model_reader.generate_with_reports(**enc, **kwargs)
    assert asked == SCREENED_QUESTIONS  # every row paid for a proposal
    assert torch.equal(after.output, first.output)
    for (layer, at, vector), (layer_first, at_first, vector_first) in zip(after.targets[0].edits, first.targets[0].edits):
        # the state read from the question's captured tokens is the one captured at the located position itself
        assert (layer, at) == (layer_first, at_first) and torch.equal(vector, vector_first)
    assert after.reports[0].to_dict() == first.reports[0].to_dict()


@pytest.mark.parametrize("decomposer", ["model", "both", "grammar"])
def test_a_patcher_that_asks_the_model_keeps_the_decomposition_prompts_start_computed(decomposer):
    from autopatch.decomposer import decomposition_prefix, propose_decompositions_counted
    from autopatch.patcher import AutoPatcher
    from autopatch.prefix_cache import clear_prefix_cache, prefix_layout
    from autopatch.profile import PatchProfile

    model, tok, fmt = tiny_model_for_bytes("llama", seed=4), byte_tokenizer(), PromptFormat()
    question = "What is the capital of the largest country in Africa?"
    row = fmt.encode(tok, decomposition_prompt(fmt, tok, question)).input_ids[0]
    start = decomposition_prefix(fmt, tok)
    assert len(start) > 100 and row[: len(start)].tolist() == start  # the instruction and the examples
    clear_prefix_cache(model)
    whole = propose_decompositions_counted(model, tok, fmt, [question], max_new_tokens=6)
    assert prefix_layout(model, [row], tok.pad_token_id).prefix_len == 0  # a lone row's own start: run whole
    AutoPatcher(model, tok, PatchProfile(source_layer=2, target_layer=1, prompt_format=fmt), decomposer=decomposer)
    expected = 0 if decomposer == "grammar" else len(start)
    assert prefix_layout(model, [row], tok.pad_token_id).prefix_len == expected
    propose_decompositions_counted(model, tok, fmt, [question], max_new_tokens=6)  # computes the start once
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        again = propose_decompositions_counted(model, tok, fmt, [question], max_new_tokens=6)
    finally:
        handle.remove()
    assert again == whole and seen[0] == len(row) - expected  # the prefill runs the question's own tokens only
    clear_prefix_cache(model)
