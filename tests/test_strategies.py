"""Strategies built from others' parts: ``second-opinion`` (decompose, with the hidden state's readout as a second
opinion) chooses between two bridges only where they disagree, by the confidence of the second hop's answer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import autopatch.strategies as strategies
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
             "Who founded the company that makes the iPhone?",
             "What is the language of the country where Tango began?"]
PROFILE = PatchProfile(strategy="second-opinion", source_layer=2, target_layer=1, prompt_format=FMT,
                       max_bridge_tokens=3)


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model_for_bytes("llama", seed=4), byte_tokenizer()


def jobs_of(model, tok):
    """The patch jobs AutoPatcher would build for QUESTIONS (via a spy on the strategy's builder)."""
    seen = {}

    def spy(model, tok, profile, jobs, vectors):
        seen["jobs"], seen["vectors"] = list(jobs), list(vectors)
        return strategies.build_decompose(model, tok, profile, jobs, vectors)

    original = strategies.build_second_opinion
    strategies.build_second_opinion = spy
    try:
        enc = tok([FMT.render(q) for q in QUESTIONS], return_tensors="pt", padding=True)
        AutoPatcher(model, tok, PROFILE, gate=AlwaysPatch()).generate(**enc, max_new_tokens=1, do_sample=False,
                                                                      pad_token_id=0, questions=QUESTIONS)
    finally:
        strategies.build_second_opinion = original
    return seen["jobs"], seen["vectors"]


def test_second_opinion_is_a_standalone_strategy_that_reads_the_state():
    assert "second-opinion" in standalone_strategies() and STRATEGIES["second-opinion"].uses_state


@pytest.mark.parametrize("a,b,same", [("Italy", "italy.", True), ("the Vatican", "Vatican", True),
                                      ("Italy", "Rome", False), ("Steve Jobs", "Steve Wozniak", False)])
def test_two_bridges_are_the_same_once_case_punctuation_and_an_article_are_set_aside(a, b, same):
    assert strategies._same_bridge(a, b) is same


def test_the_words_win_unless_the_state_disagrees_and_its_answer_is_given_more_confidently(model_tok, monkeypatch):
    model, tok = model_tok
    jobs, vectors = jobs_of(model, tok)
    said = [("Italy", 2), ("Apple", 1), ("Argentina", 3)]
    read = [("italy", 1), ("Microsoft", 2), ("", 0)]  # agrees; disagrees; reads nothing

    def bridges(model, tok, profile, jobs, vectors):
        return said if vectors[0] is None else read  # the words' route passes no vectors

    probed = []

    def confidence(model, tok, targets, max_new_tokens):
        probed.extend(t.bridge or t.prompt_text for t in targets)
        return [(-2.0, 4), (-0.5, 5)]  # the state's bridge answers more confidently

    monkeypatch.setattr(strategies, "decode_bridges_counted", bridges)
    monkeypatch.setattr(strategies, "answer_confidence", confidence)
    targets = strategies.build_second_opinion(model, tok, PROFILE, jobs, vectors)
    assert [t.bridge for t in targets] == ["Italy", "Microsoft", "Argentina"]
    assert [t.bridge_tokens for t in targets] == [3, 3 + 9, 3]  # both bridges, and both probes where disputed
    assert probed == ["Apple", "Microsoft"]  # only the disputed row was probed
    monkeypatch.setattr(strategies, "answer_confidence", lambda *a: [(-0.5, 4), (-2.0, 5)])
    assert strategies.build_second_opinion(model, tok, PROFILE, jobs, vectors)[1].bridge == "Apple"


def test_second_opinion_runs_batched_end_to_end_and_counts_its_tokens(model_tok):
    model, tok = model_tok
    enc = tok([FMT.render(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    result = AutoPatcher(model, tok, PROFILE, gate=AlwaysPatch()).generate_with_reports(
        **enc, max_new_tokens=3, do_sample=False, pad_token_id=0, questions=QUESTIONS)
    decompose = AutoPatcher(model, tok, replace(PROFILE, strategy="decompose"), gate=AlwaysPatch()).generate_with_reports(
        **enc, max_new_tokens=3, do_sample=False, pad_token_id=0, questions=QUESTIONS)
    assert sorted(result.targets) == sorted(decompose.targets) and result.targets
    for row, target in result.targets.items():
        assert target.bridge_tokens >= decompose.targets[row].bridge_tokens  # the words' bridge, and more
    scores = strategies.answer_confidence(model, tok, list(result.targets.values()), 4)
    assert all(n <= 4 and (s == float("-inf") or s <= 0.0) for s, n in scores)
