"""``StopOnText`` stops each row where transformers' ``stop_strings`` would, without its vocabulary tables."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteriaList

from autopatch.gating import AlwaysPatch, NeverPatch
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from autopatch.stopping import StopOnText
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("cut", [(2, 3), (3, 5), (5, 8)])
def test_rows_stop_at_the_step_transformers_stop_strings_would(cut):
    model, tok = tiny_model_for_bytes("llama", seed=3), byte_tokenizer()
    enc = tok(["The capital of Italy is", "Q: Who wrote Hamlet?\nA:", "x"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    width = enc.input_ids.shape[1]
    free = model.generate(**enc, **kwargs)
    stops = [tok.decode(free[0, width:])[cut[0]:cut[1]]]  # text row 0 does generate, so it must stop early
    ours = model.generate(**enc, **kwargs, stopping_criteria=StoppingCriteriaList([StopOnText(tok, stops, width)]))
    theirs = model.generate(**enc, **kwargs, stop_strings=stops, tokenizer=tok)
    assert torch.equal(ours, theirs)
    assert (ours[0, width:] == 0).any() or ours.shape[1] < free.shape[1]  # row 0 stopped before the budget


def test_answer_cuts_at_the_formats_stop_strings_without_transformers_tables(monkeypatch):
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    fmt = PromptFormat(demonstrations=(("Which planet is red?", "Mars"),))
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    for gate in (NeverPatch(), AlwaysPatch()):
        patcher = AutoPatcher(model, tok, PatchProfile(source_layer=2, target_layer=1, prompt_format=fmt), gate)
        (answer,) = patcher.answer("What is the capital of the country where the Colosseum is located?",
                                   max_new_tokens=12)
        assert all(stop not in answer.text for stop in fmt.stop_strings)
    assert calls and all("stop_strings" not in c for c in calls)


def test_cut_at_stop_is_the_earliest_stop_of_any():
    from autopatch.stopping import cut_at_stop

    assert cut_at_stop("Rome;\nQ: next", ["\nQ:", ";"]) == ("Rome", True)
    assert cut_at_stop("Rome", ["\nQ:", ""]) == ("Rome", False)  # an empty stop never matches
    assert cut_at_stop("", ["\n"]) == ("", False)


def test_stop_token_ids_are_eos_and_the_single_token_stops():
    from autopatch.stopping import BRIDGE_STOPS, stop_token_ids
    from tests.tiny_models import byte_tokenizer

    tok = byte_tokenizer()  # bytes: "\n" and ";" are one token each, "\n\n" two
    newline, semicolon = tok("\n", add_special_tokens=False).input_ids[0], tok(";", add_special_tokens=False).input_ids[0]
    assert stop_token_ids(tok, BRIDGE_STOPS) == [tok.eos_token_id, newline, semicolon]
    assert stop_token_ids(tok, ["\n\n"]) == [tok.eos_token_id]
