"""AutoPatcher.generate on tiny random models: drop-in behaviour, per-row decisions, reports."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from autopatch.engine import PatchEdit, capture, patch
from autopatch.gating import AlwaysPatch, GateDecision, NeverPatch
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from autopatch.strategies import left_pad
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
FMT = PromptFormat(demonstrations=())
QUESTIONS = [
    "What is the capital of the country where the Colosseum is located?",
    "What is 2+2?",  # unlocatable: never patched
    "Who founded the company that makes the iPhone?",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3_text"])
def setup(request):
    model, tok = tiny_model_for_bytes(request.param), byte_tokenizer()
    enc = tok([FMT.render(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    return model, tok, enc


def profile(**overrides) -> PatchProfile:
    return replace(PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT), **overrides)


class RowGate:
    """Patches exactly the rows whose question contains a word."""

    feature_layers = (0,)

    def __init__(self, word):
        self.word = word

    def decide(self, inputs):
        assert all(set(i.states) == {0, 2} and i.states[0].shape[0] == 3 for i in inputs)
        return [GateDecision(self.word in (i.question or ""), 0.5, "test gate") for i in inputs]


@pytest.mark.parametrize("how", ["never-gate", "patching=False"])
def test_not_patching_is_token_for_token_model_generate(setup, how):
    model, tok, enc = setup
    gate = NeverPatch() if how == "never-gate" else AlwaysPatch()
    patcher = AutoPatcher(model, tok, profile(), gate=gate)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    reference = model.generate(**enc, **kwargs, output_scores=True, return_dict_in_generate=True)
    ours = patcher.generate(**enc, **kwargs, output_scores=True, return_dict_in_generate=True,
                            patching=(how == "never-gate"))
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.scores, reference.scores):
        assert torch.equal(a, b)
    assert type(ours) is type(reference)
    plain = patcher.generate(enc.input_ids, attention_mask=enc.attention_mask, **kwargs, patching=(how == "never-gate"))
    assert torch.equal(plain, reference.sequences)
    assert not any(r.patched for r in patcher.last_report)


def test_patched_rows_answer_from_the_patched_target_and_others_continue(setup):
    model, tok, enc = setup
    patcher = AutoPatcher(model, tok, profile(), gate=RowGate("Colosseum"))
    width = enc.input_ids.shape[1]
    vanilla = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = patcher.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, :width], enc.input_ids)  # the caller's prompt is kept
    reports = patcher.last_report
    assert [r.patched for r in reports] == [True, False, False]
    assert not reports[1].located and "unlocatable" in reports[1].reason
    assert reports[2].located and not reports[2].patched
    assert torch.equal(out[1:, width:width + 5], vanilla[1:, width:])  # unpatched rows: the same call's tokens

    # by hand: capture the source state, patch it over the placeholder of the fresh prompt, generate
    row = enc.input_ids[0][enc.attention_mask[0].bool()]
    with capture(model, [2], [reports[0].positions["span_end"]]) as cap:
        model(row[None])
    target = reports[0].target_prompt
    assert target == FMT.render("What is the capital of x?")
    target_ids = tok(target, return_tensors="pt").input_ids
    placeholder = len(tok("Q: What is the capital of x").input_ids) - 1
    with patch(model, [PatchEdit(1, 0, placeholder, cap.states[2][0, 0])]):
        expected = model.generate(target_ids, attention_mask=torch.ones_like(target_ids), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0)[0, target_ids.shape[1]:]
    assert out[0, width:width + len(expected)].tolist() == expected.tolist()


def test_on_final_hands_over_the_rows_left_alone_before_the_patched_rows_are_generated(setup):
    model, tok, enc = setup
    patcher = AutoPatcher(model, tok, profile(), gate=RowGate("Colosseum"))
    width = enc.input_ids.shape[1]
    forwards: list[int] = []
    handle = model.register_forward_hook(lambda *args: forwards.append(1))
    seen = []

    def on_final(rows, sequences, reports):
        seen.append((rows, sequences.clone(), [r.to_dict() for r in reports], len(forwards)))

    try:
        result = patcher.generate_with_reports(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                               on_final=on_final)
    finally:
        handle.remove()
    (rows, sequences, reports, at), = seen
    assert rows == [1, 2] and at < len(forwards)  # the patched row's own generation ran after
    for i in rows:
        assert sequences[i, width:].tolist() == result.output[i, width:sequences.shape[1]].tolist()
        assert reports[i] == result.reports[i].to_dict()  # answer included
    assert result.reports[0].patched and not reports[0]["answer"]
    none_left = []
    patcher.generate_with_reports(enc.input_ids[:1], attention_mask=enc.attention_mask[:1], max_new_tokens=3,
                                  do_sample=False, pad_token_id=0, on_final=lambda *a: none_left.append(a))
    assert none_left == []  # the one row was patched: nothing to hand over early


def test_dict_output_merges_scores_and_carries_reports(setup):
    model, tok, enc = setup
    patcher = AutoPatcher(model, tok, profile(), gate=RowGate("iPhone"))
    out = patcher.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0,
                           output_scores=True, return_dict_in_generate=True)
    plain = patcher.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == out.sequences.shape[1] - enc.input_ids.shape[1]
    width = enc.input_ids.shape[1]
    for step, scores in enumerate(out.scores):
        assert torch.equal(scores.argmax(-1), out.sequences[:, width + step])
    assert [r.patched for r in out.autopatch] == [False, False, True]


def test_max_length_gives_patched_rows_the_same_budget(setup):
    model, tok, enc = setup
    patcher = AutoPatcher(model, tok, profile(), gate=AlwaysPatch())
    width = enc.input_ids.shape[1]
    out = patcher.generate(**enc, max_length=width + 3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == width + 3


@pytest.mark.parametrize("strategy", ["reroute", "backpatch", "verbalize"])
def test_every_strategy_runs_batched(setup, strategy):
    model, tok, enc = setup
    prof = profile(strategy=strategy, source_layer=3, target_layer=1, max_bridge_tokens=3)
    patcher = AutoPatcher(model, tok, prof, gate=AlwaysPatch())
    out = patcher.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 3
    patched = [r for r in patcher.last_report if r.patched]
    assert len(patched) == 2 and all(r.strategy == strategy and r.target_prompt for r in patched)
    if strategy == "verbalize":
        assert all(r.bridge is not None for r in patched)


def test_streamer_sees_the_answer_that_is_returned(setup):
    model, tok, enc = setup

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    single = tok([FMT.render(QUESTIONS[0])], return_tensors="pt")
    for gate in (AlwaysPatch(), NeverPatch()):
        streamer = Collect()
        patcher = AutoPatcher(model, tok, profile(), gate=gate)
        out = patcher.generate(**single, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                               streamer=streamer)
        width = single.input_ids.shape[1]
        assert streamer.puts[0] == single.input_ids[0].tolist()
        assert sum(streamer.puts[1:], []) == out[0, width:].tolist()
        assert streamer.ended


def test_questions_argument_and_unfound_questions(setup):
    model, tok, enc = setup
    patcher = AutoPatcher(model, tok, profile(), gate=AlwaysPatch())
    patcher.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0,
                     questions=[QUESTIONS[0], "Who is the spouse of the Green performer?", None])
    reasons = [r.reason for r in patcher.last_report]
    assert patcher.last_report[0].patched
    assert "does not occur" in reasons[1]  # that question is not in row 1's prompt


def test_beam_search_runs_unpatched_with_a_reason(setup):
    model, tok, enc = setup
    patcher = AutoPatcher(model, tok, profile(), gate=AlwaysPatch())
    out = patcher.generate(**enc, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(out, model.generate(**enc, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0))
    assert "beams" in patcher.last_report[0].reason


def test_left_pad_helper():
    ids, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_arbitrary_prompts_never_crash_the_planner(setup):
    model, tok, _ = setup
    patcher = AutoPatcher(model, tok, profile(), gate=AlwaysPatch())
    prompts = ["", "no question here", "Q: \nA:", "Q: Wer ist der Autor von Faust?\nA:", "Q: ??? of the of the\nA:"]
    enc = tok([p or " " for p in prompts], return_tensors="pt", padding=True)
    out = patcher.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[0] == len(prompts)
    assert all(r.reason for r in patcher.last_report)


def test_right_padding_and_empty_inputs_are_clear_errors_and_embeds_run_unpatched():
    from autopatch.errors import PatchError

    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    patcher = AutoPatcher(model, tok, profile(), gate=AlwaysPatch())
    tok.padding_side = "right"
    try:
        enc = tok([FMT.render(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "left"
    with pytest.raises(PatchError, match="right-padded"):
        patcher.generate(**enc, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(PatchError, match="at least one token"):
        patcher.generate(input_ids=torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2, pad_token_id=0)
    one = tok([FMT.render(QUESTIONS[0])], return_tensors="pt")
    embeds = model.get_input_embeddings()(one.input_ids)
    out = patcher.generate(inputs_embeds=embeds, attention_mask=one.attention_mask, max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
    assert out.shape == (1, 2) and len(patcher.last_report) == 1 and not patcher.last_report[0].patched
    assert "inputs_embeds" in patcher.last_report[0].reason


def test_user_criteria_and_processors_see_the_callers_sequence_on_patched_rows(setup):
    from transformers import LogitsProcessor, LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList

    model, tok, enc = setup
    width = enc.input_ids.shape[1]
    seen = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(input_ids.clone())
            return scores

    patcher = AutoPatcher(model, tok, profile(), gate=AlwaysPatch())
    out = patcher.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(max_length=width + 2)]),
                           logits_processor=LogitsProcessorList([Record()]))
    reference = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0,
                               stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(max_length=width + 2)]))
    assert out.shape[1] == reference.shape[1] == width + 2  # the caller's limit holds on patched rows too
    patched = [i for i, r in enumerate(patcher.last_report) if r.patched]
    assert patched
    target_calls = [ids for ids in seen if ids.shape[0] == len(patched)]
    assert target_calls and all(torch.equal(ids[:, :width], enc.input_ids[patched]) for ids in target_calls)


def test_a_streamer_with_a_batch_is_a_clear_error(setup):
    from autopatch.errors import PatchError

    model, tok, enc = setup

    class Sink:
        def put(self, value):
            pass

        def end(self):
            pass

    patcher = AutoPatcher(model, tok, profile(), gate=AlwaysPatch())
    with pytest.raises(PatchError, match="streamer needs a batch of one prompt"):
        patcher.generate(**enc, max_new_tokens=2, pad_token_id=0, streamer=Sink())
    out = patcher.generate(**enc, max_new_tokens=2, pad_token_id=0, streamer=Sink(), patching=False)
    assert out.shape[0] == enc.input_ids.shape[0]
