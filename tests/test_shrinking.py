"""Greedy batches in rounds (finished rows leave) give exactly ``model.generate``'s output and callbacks' view."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from autopatch import shrinking
from autopatch.prefix_cache import left_pad, prefix_layout
from autopatch.shrinking import shrinking_generate
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = ["llama", "qwen2", "gemma3_text", "gpt2"]
PROMPTS = ["Q: capital of Italy? A:", "Q: who made the iPhone? A:", "Q: 2+2? A:", "hello there, friend",
           "Q: capital of the country where the Colosseum is? A:"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    overrides = {"sliding_window": 512} if request.param == "gemma3_text" else {}
    return tiny_model_for_bytes(request.param, **overrides), byte_tokenizer()


class RowBudgets(StoppingCriteria):
    """Stops row i after budgets[i] new tokens; records every call's batch size and what it saw."""

    def __init__(self, width: int, budgets: list[int]):
        self.width, self.budgets, self.seen = width, budgets, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids.clone())
        new = input_ids.shape[1] - self.width
        return torch.tensor([new >= b for b in self.budgets], dtype=torch.bool)


class BanPreviousToken(LogitsProcessor):
    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[torch.arange(len(scores)), input_ids[:, -1]] = -float("inf")
        return scores


def _generate_calls(model, monkeypatch) -> list[dict]:
    """The keyword arguments of every ``model.generate`` call from now on (each still runs)."""
    calls: list[dict] = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    return calls


def _batch(tok):
    return left_pad([tok(p, return_tensors="pt").input_ids[0] for p in PROMPTS], tok.pad_token_id)


def _both(model, ids, mask, budgets, **kwargs):
    outs, seen = [], []
    for run in (model.generate, lambda **kw: shrinking_generate(model, **kw)):
        criteria = RowBudgets(ids.shape[1], budgets)
        outs.append(run(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                        stopping_criteria=StoppingCriteriaList([criteria]),
                        logits_processor=LogitsProcessorList([BanPreviousToken()]), **kwargs))
        seen.append(criteria.seen)
    return outs, seen


def test_rows_of_different_lengths_give_generates_output_and_callbacks_see_the_same(tiny, monkeypatch):
    model, tok = tiny
    ids, mask = _batch(tok)
    calls = _generate_calls(model, monkeypatch)
    (plain, shrunk), (seen_plain, seen_shrunk) = _both(model, ids, mask, [2, 1, 9, 3, 12], pad_token_id=0,
                                                       eos_token_id=[255])
    rounds = [c["input_ids"].shape[0] for c in calls]
    assert rounds[0] == 5 and len(rounds) >= 3 and rounds[-1] < 5  # it did drop rows (first call: the plain run)
    assert torch.equal(plain, shrunk)
    assert len(seen_plain) == len(seen_shrunk) and all(torch.equal(a, b) for a, b in zip(seen_plain, seen_shrunk))


def test_eos_and_the_budget_end_rows_as_in_generate(tiny):
    model, tok = tiny
    ids, mask = _batch(tok)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = sorted({int(plain[0, ids.shape[1] + 1]), int(plain[2, ids.shape[1] + 3])})  # tokens that end some rows
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(model.generate(**kwargs), shrinking_generate(model, **kwargs))


def test_a_cached_prefix_continues_across_rounds(tiny):
    model, tok = tiny
    rows = [tok(p, return_tensors="pt").input_ids[0] for p in ["The answer to " + p for p in PROMPTS]]
    lay = prefix_layout(model, rows, tok.pad_token_id)
    assert lay.prefix_len > 0
    outs = []
    for run in (model.generate, lambda **kw: shrinking_generate(model, **kw)):
        outs.append(run(input_ids=lay.input_ids, attention_mask=lay.attention_mask, max_new_tokens=8,
                        do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList(
                            [RowBudgets(lay.width, [1, 8, 2, 2, 5])]),
                        **prefix_layout(model, rows, tok.pad_token_id).generate_kwargs(model)))
    assert torch.equal(*outs)


@pytest.mark.parametrize("kwargs", [dict(do_sample=True), dict(num_beams=2), dict(return_dict_in_generate=True),
                                    dict(min_new_tokens=3), dict(max_length=80), dict(output_scores=True)])
def test_calls_that_cannot_restart_are_plain_generate(kwargs, monkeypatch):
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    ids, mask = _batch(tok)
    calls = _generate_calls(model, monkeypatch)
    args = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=[255], **kwargs)
    if "max_length" in kwargs:
        args.pop("max_new_tokens")
    shrinking_generate(model, input_ids=ids, attention_mask=mask, **args)
    assert len(calls) == 1 and "return_dict_in_generate" not in calls[0] or kwargs.get("return_dict_in_generate")


def test_a_single_row_or_no_eos_is_plain_generate(monkeypatch):
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    ids, mask = _batch(tok)
    assert not shrinking._restartable(ids[:1], {"max_new_tokens": 4}, model.generation_config)
    calls = _generate_calls(model, monkeypatch)
    model.generation_config.eos_token_id = None
    shrinking_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert len(calls) == 1


def test_a_cache_that_cannot_drop_rows_or_a_static_cache_is_plain_generate(monkeypatch):
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    ids, mask = _batch(tok)
    calls = _generate_calls(model, monkeypatch)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, eos_token_id=[255])
    from transformers import DynamicCache

    class Unselectable(DynamicCache):
        batch_select_indices = None

    shrinking_generate(model, **args, past_key_values=Unselectable())
    monkeypatch.setattr(model, "_supports_default_dynamic_cache", lambda: False, raising=False)
    shrinking_generate(model, **args)
    assert len(calls) == 2 and not any("return_dict_in_generate" in c for c in calls)
    assert not shrinking._restartable(ids, {"max_new_tokens": 4}, type(model.generation_config)(cache_implementation="static"))


def test_a_capture_on_every_forward_call_keeps_every_row(monkeypatch):
    """A capture with prefill_only=False records the whole batch at each step: no rows may leave under it."""
    from autopatch.engine import acts_on_every_call, capture

    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    ids, mask = _batch(tok)
    budgets = StoppingCriteriaList([RowBudgets(ids.shape[1], [1, 1, 1, 6, 6])])
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                eos_token_id=[255], stopping_criteria=budgets)
    with capture(model, [1], prefill_only=False) as cap:
        assert acts_on_every_call(model)
        shrinking_generate(model, **args)
    assert cap.states[1].shape[0] == len(PROMPTS) and not acts_on_every_call(model)
    with capture(model, [1]) as cap:  # the default, prefill only: rounds as usual
        assert not acts_on_every_call(model)
        shrinking_generate(model, **args)
