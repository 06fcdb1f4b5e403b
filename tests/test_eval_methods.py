"""The text-only baselines and controls that a patch method must beat, and chain of thought done fairly.

``decompose`` (the located first hop asked in words), ``control-text`` (the subject's words in the placeholder),
the chat CoT formats, Kojima's two-stage CoT, and the CoT answer-extraction rule on real model outputs.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from autopatch.gating import AlwaysPatch
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import CHAT_INSTRUCTION, PromptFormat
from autopatch.registry import CONTROLS, STRATEGIES
from eval.cot import (
    CHAT_COT_INSTRUCTION,
    COT_TRIGGER,
    KOJIMA_ANSWER_TRIGGER,
    cot_fewshot_prompt,
    cot_prompt,
    kojima_answer_prompt,
    kojima_prompts,
)
from eval.methods import METHODS, build_context
from eval.metrics import extract_answer, score_continuation
from eval.report import summarise
from eval.twohop import generate_twohop
from tests.tiny_models import CHAT_TEMPLATE, byte_tokenizer

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTION = "What is the capital of the country where the Colosseum is located?"


def _generate(patcher: AutoPatcher, questions: list[str]):
    enc = patcher.encode(questions)
    return patcher.generate_with_reports(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0, questions=questions)


def _profile(strategy: str = "reroute", **extra) -> PatchProfile:
    return PatchProfile(strategy=strategy, source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()),
                        **extra)


def test_decompose_is_registered_as_a_text_only_baseline():
    assert not STRATEGIES["decompose"].uses_state and STRATEGIES["verbalize"].uses_state
    assert METHODS["decompose"].kind == "baseline" and METHODS["reroute"].kind == "patch"
    assert CONTROLS["text"].subject_text and METHODS["control-text"].kind == "control"


def test_decompose_asks_the_located_first_hop_in_words_and_patches_nothing(tiny):
    model, tok = tiny
    result = _generate(AutoPatcher(model, tok, _profile("decompose"), AlwaysPatch()), [QUESTION])
    target, report = result.targets[0], result.reports[0]
    assert report.patched and target.edits == []  # no hidden state goes in
    assert target.bridge_tokens >= 1 and report.bridge_tokens == target.bridge_tokens
    # the second hop is asked with the decoded bridge (or the span itself when nothing was decoded) in the slot
    filled = target.bridge or "the country where the Colosseum is located"
    assert f"What is the capital of {filled}?" in target.prompt_text


def test_decompose_equals_span_verbalize_with_the_subjects_words_for_its_state(tiny):
    """decompose and verbalize (span prompt) differ only in the subject's text versus the subject's state."""
    from autopatch.strategies import _bridge_prompts, build_decompose

    model, tok = tiny
    patcher = AutoPatcher(model, tok, _profile("verbalize", bridge_prompt="span"), AlwaysPatch())
    enc = patcher.encode([QUESTION])
    with patcher.prefill(enc.input_ids, enc.attention_mask, [2], [QUESTION]) as pre:
        model(**enc)
    job = pre.job(0, "subject_end", 2)
    (ids, _), = _bridge_prompts(tok, patcher.profile, [replace(job, placeholder="Colosseum")])
    assert "What is the country where the Colosseum is located?" in tok.decode(ids)
    (text_target,) = build_decompose(model, tok, patcher.profile, [job], [job.vector])
    assert text_target.edits == []


@pytest.mark.parametrize("strategy", ["reroute", "verbalize"])
def test_control_text_writes_the_subject_into_the_placeholder_without_a_patch(tiny, strategy):
    model, tok = tiny
    patcher = AutoPatcher(model, tok, _profile(strategy, bridge_prompt="span"), AlwaysPatch(), control="text")
    target = _generate(patcher, [QUESTION]).targets[0]
    assert target.edits == []
    if strategy == "reroute":
        assert "What is the capital of Colosseum?" in target.prompt_text
    else:  # the bridge prompt asked with the subject's words: decompose's first hop
        assert target.bridge is not None


def test_chat_zero_shot_cot_asks_for_reasoning_and_a_fixed_last_line():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    fmt = PromptFormat(kind="chat")
    text = cot_prompt(fmt, QUESTION, tok)
    assert text.startswith(f"<|im_start|>system\n{CHAT_COT_INSTRUCTION}<|im_end|>")
    assert CHAT_INSTRUCTION not in text and "Which planet" not in text  # zero-shot: no short-answer demonstrations
    assert text.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert COT_TRIGGER not in text  # the trigger no longer sits inside the assistant turn


def test_chat_fewshot_cot_renders_reasoning_demonstrations_as_turns():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    text = cot_fewshot_prompt(PromptFormat(kind="chat"), QUESTION, tok)
    assert "<|im_start|>assistant\nThe river that flows through Cairo is the Nile." in text
    assert "\nAnswer: the Mediterranean Sea<|im_end|>" in text
    assert text.count("<|im_start|>user") == 3


def test_base_fewshot_cot_keeps_the_answer_is_demonstrations():
    text = cot_fewshot_prompt(PromptFormat(), QUESTION)
    assert "So the answer is the Mediterranean Sea.\n\n" in text and text.endswith(f"Q: {QUESTION}\nA:")


@pytest.mark.parametrize("kind,chat", [("fewshot-qa", False), ("chat", True)])
def test_kojima_two_stage_prompts(kind, chat):
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    fmt = PromptFormat(kind=kind)
    stage1 = kojima_prompts(fmt, QUESTION, tok)
    assert stage1.endswith(COT_TRIGGER)
    if chat:
        assert "<|im_start|>system" not in stage1 and stage1.endswith(f"<|im_start|>assistant\n{COT_TRIGGER}")
    else:
        assert stage1 == cot_prompt(fmt, QUESTION)
    stage2 = kojima_answer_prompt(stage1, " It is in Italy.  ")
    assert stage2 == f"{stage1} It is in Italy.\n{KOJIMA_ANSWER_TRIGGER}"


# Real outputs, copied from runs of the embedded models (Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M).
REAL_COT_OUTPUTS = [
    ("Answer: Paris", "Paris"),  # chat zero-shot CoT, Qwen 0.5B
    ("The capital of the Pont du Gard's country is Paris.", "Paris"),  # chat few-shot CoT answered in one sentence
    ("The capital of the country where the Uffizi Gallery is located is Cairo.", "Cairo"),
    ("The Pont du Gard's country is located in France. France is a country in Europe, and the capital of France is "
     "Paris.\nTherefore, the answer is Paris.", "Paris"),  # cot-2stage
    ("The Uffizi Gallery is located in Italy.\nTherefore, the answer is Italy.", "Italy"),
    ("The Colosseum is in Italy. The capital of Italy is Rome.\n**Answer:** Rome.", "Rome"),
    (" The river that flows through Lyon is the Rhône. So the answer is the Mediterranean Sea.\n\nQ: x", "the Mediterranean Sea"),
]


@pytest.mark.parametrize("text,expected", REAL_COT_OUTPUTS)
def test_cot_extraction_on_real_outputs(text, expected):
    assert extract_answer(text, cot=True) == expected


def test_direct_answers_keep_the_first_line_rule():
    assert extract_answer(" Rome\n\nQ: What is the capital of Spain?") == "Rome"
    assert extract_answer("The capital is Rome.") == "The capital is Rome"  # no copula rule outside CoT


@pytest.mark.parametrize("name", ["decompose", "control-text", "cot-2stage", "second-opinion-model"])
def test_the_new_methods_run_in_the_harness(tiny, name):
    model, tok = tiny
    records = generate_twohop("test")[:3]
    ctx = build_context(model, tok, profile=_profile(), budget=3, cot_budget=4, gold_scores=False)
    results = METHODS[name].run(ctx, records)
    assert len(results) == 3 and all(r.n_tokens >= 1 for r in results)
    if name == "cot-2stage":
        assert all(KOJIMA_ANSWER_TRIGGER in r.continuation for r in results)
        assert all(r.n_tokens <= 4 + 3 for r in results)  # both stages counted, each within its budget
    if name == "decompose":
        assert all(r.n_tokens > 0 for r in results)


def test_the_report_says_whether_a_patch_method_beats_decompose(tmp_path):
    rows = []
    for i in range(6):
        for method, em in (("vanilla", 0.0), ("decompose", float(i < 4)), ("patch", float(i < 2))):
            rows.append({"method": method, "id": f"q{i}", "em": em, "f1": em, "contains": em, "n_tokens": 3,
                         "seconds": 0.1, "patched": method == "patch"})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarise(tmp_path)
    versus = summary["vs_decompose"]["patch"]
    assert (versus["em"], versus["decompose_em"], versus["fixed"], versus["broken"]) == (2 / 6, 4 / 6, 0, 2)
    from eval.report import report_markdown

    assert "`patch` does not beat `decompose`" in report_markdown(summary, "cmd")


def test_a_patch_method_with_a_reader_suffix_is_set_against_the_decomposition_with_that_reader(tmp_path):
    rows = []
    for i in range(6):
        for method, em in (("vanilla", 0.0), ("decompose", 0.0), ("decompose-model", float(i < 4)),
                           ("second-opinion-model", float(i < 3)), ("second-opinion", float(i < 1))):
            rows.append({"method": method, "id": f"q{i}", "em": em, "f1": em, "contains": em, "n_tokens": 3,
                         "seconds": 0.1, "patched": True})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    versus = summarise(tmp_path)["vs_decompose"]
    assert versus["second-opinion-model"]["reference"] == "decompose-model"
    assert (versus["second-opinion-model"]["decompose_em"], versus["second-opinion-model"]["broken"]) == (4 / 6, 1)
    assert versus["second-opinion"]["reference"] == "decompose" and versus["second-opinion"]["fixed"] == 1
    from eval.report import report_markdown

    assert "`second-opinion-model` does not beat `decompose-model`" in report_markdown(summarise(tmp_path), "cmd")


def test_score_continuation_uses_the_cot_rule_only_for_cot():
    assert score_continuation("The capital is Rome.", ["Rome"], cot=True)["em"] == 1.0
    assert score_continuation("The capital is Rome.", ["Rome"])["em"] == 0.0
