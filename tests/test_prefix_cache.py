"""Shared-prefix KV caching gives the tokens of the uncached path, for plain, patched and gated generation."""

from __future__ import annotations

import pytest
import torch

from autopatch.gating import AlwaysPatch
from autopatch.patcher import AutoPatcher
from autopatch.prefix_cache import MIN_PREFIX_TOKENS, _prefix_cache, clear_prefix_cache, prefix_layout, shared_prefix_len
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from autopatch.strategies import Target, left_pad, run_targets
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FMT = PromptFormat(demonstrations=(("Which planet is red?", "Mars"),))
QUESTIONS = [
    "What is the capital of the country where the Colosseum is located?",
    "Who founded the company that makes the iPhone?",
    "What is 2+2?",
]
ARCHS = ["llama", "llama_tuple_blocks", "qwen2", "gemma3_text", "gpt2", "mistral"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    # Gemma 3's tiny config has an 8-token sliding window, which disables the cache; the real one has 512.
    overrides = {"sliding_window": 512} if request.param == "gemma3_text" else {}
    return tiny_model_for_bytes(request.param, **overrides), byte_tokenizer()


def _rows(tok, texts):
    return [tok(t, return_tensors="pt").input_ids[0] for t in texts]


def test_shared_prefix_len():
    a, b = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5])
    assert shared_prefix_len([a, b]) == 2 and shared_prefix_len([a]) == 4 and shared_prefix_len([]) == 0


def test_generation_from_a_cached_prefix_is_token_for_token_the_plain_batch(tiny):
    model, tok = tiny
    rows = _rows(tok, [FMT.render(q) for q in QUESTIONS])
    lay = prefix_layout(model, rows, tok.pad_token_id)
    assert lay.prefix_len >= MIN_PREFIX_TOKENS
    ids, mask = left_pad(rows, tok.pad_token_id)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    cached = model.generate(input_ids=lay.input_ids, attention_mask=lay.attention_mask, **lay.generate_kwargs(model),
                            **kwargs)[:, lay.width:]
    assert torch.equal(plain, cached)
    assert torch.equal(lay.caller_sequences(torch.cat([lay.input_ids, cached], 1), ids)[:, : ids.shape[1]], ids)


def test_patched_targets_give_the_same_tokens_with_and_without_the_cached_prefix(tiny):
    model, tok = tiny
    rows = _rows(tok, [FMT.render(q) for q in QUESTIONS])
    vector = torch.randn(model.config.hidden_size) * 3
    targets = [Target(i, r, [(1, len(r) - 4, vector), (0, -2, -vector)]) for i, r in enumerate(rows)]
    plain, w1 = run_targets(model, tok, targets, reuse_prefix=False, max_new_tokens=5, do_sample=False)
    cached, w2 = run_targets(model, tok, targets, max_new_tokens=5, do_sample=False)
    assert w2 == w1  # the layout keeps the width: prefix + the longest suffix
    assert torch.equal(plain[:, w1:], cached[:, w2:])


def test_autopatcher_generate_is_the_same_with_and_without_the_cached_prefix(tiny):
    model, tok = tiny
    profile = PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT)
    enc = tok([FMT.render(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    outs = []
    for reuse in (False, True):
        patcher = AutoPatcher(model, tok, profile, AlwaysPatch(), reuse_prefix=reuse)
        result = patcher.generate_with_reports(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                               return_dict_in_generate=True, output_scores=True)
        outs.append(result)
    plain, cached = outs
    assert torch.equal(plain.output.sequences, cached.output.sequences)
    assert torch.equal(cached.output.sequences[:, : enc.input_ids.shape[1]], enc.input_ids)  # the caller's prompt
    assert [r.to_dict() for r in plain.reports] == [r.to_dict() for r in cached.reports]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain.output.scores, cached.output.scores))


def test_lone_requests_with_a_system_prompt_of_their_own_are_answered_the_same_from_its_cached_start(tiny):
    """Requests one at a time under a client's own system prompt (not the format's start): from the second
    one on, the prompt's start comes from the cache, and every patched answer, report and score is the same."""
    model, tok = tiny
    clear_prefix_cache(model)
    profile = PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT)
    system = "Museum help desk; be brief.\n\n"  # short: the tiny GPT-2 has 128 positions
    # The second request computes the start it shares with the first (its question's first letter differs),
    # the third takes it from the cache.
    prompts = [system + FMT.render(q) for q in (QUESTIONS[1], "Name the capital of Peru.", "Is 7 prime?")]
    runs = []
    for reuse in (False, True):
        patcher, seen = AutoPatcher(model, tok, profile, AlwaysPatch(), reuse_prefix=reuse), []
        handle = model.register_forward_pre_hook(lambda m, a, k, seen=seen: seen.append(k["input_ids"].shape[1]),
                                                 with_kwargs=True)
        try:
            results = []
            for p in prompts:
                seen.append(None)  # where this request's forwards start
                results.append(patcher.generate_with_reports(**tok([p], return_tensors="pt"), max_new_tokens=4,
                                                             do_sample=False, pad_token_id=0,
                                                             return_dict_in_generate=True, output_scores=True))
        finally:
            handle.remove()
        runs.append((results, seen))
    (plain, plain_seen), (cached, cached_seen) = runs
    for a, b in zip(plain, cached):
        assert torch.equal(a.output.sequences, b.output.sequences)
        assert [r.to_dict() for r in a.reports] == [r.to_dict() for r in b.reports]
        assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a.output.scores, b.output.scores))
    assert sum(n or 0 for n in cached_seen) < sum(n or 0 for n in plain_seen)  # fewer tokens run, prefixes included
    clear_prefix_cache(model)


def test_captured_and_patched_positions_never_fall_inside_the_cached_prefix():
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    rows = _rows(tok, [FMT.render(q) for q in QUESTIONS])
    full = prefix_layout(model, rows, tok.pad_token_id)
    cut = prefix_layout(model, rows, tok.pad_token_id, protect=[full.prefix_len - 3])
    assert cut.prefix_len == full.prefix_len - 3
    assert prefix_layout(model, rows, tok.pad_token_id, protect=[2]).prefix_len == 0  # too short to be worth it
    assert prefix_layout(model, rows, tok.pad_token_id, enabled=False).prefix_len == 0


def test_a_whole_row_is_never_cached():
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    row = _rows(tok, [FMT.render(QUESTIONS[0])])[0]
    lay = prefix_layout(model, [row, row.clone()], tok.pad_token_id)
    assert lay.prefix_len == len(row) - 1  # the last token's logits start the answer


def test_the_prefix_cache_is_computed_once_and_bounded():
    model = tiny_model_for_bytes("llama", seed=5)
    clear_prefix_cache(model)
    prefix = torch.arange(3, 20)
    first = _prefix_cache(model, prefix)
    assert _prefix_cache(model, prefix) is first
    for n in range(12):
        _prefix_cache(model, torch.arange(3, 12 + n))
    assert _prefix_cache(model, prefix) is not first  # evicted, least recently used first
    clear_prefix_cache(model)


def test_the_prefix_cache_keeps_a_bounded_number_of_bytes(monkeypatch):
    import autopatch.prefix_cache as prefix_cache

    model = tiny_model_for_bytes("llama", seed=5)
    clear_prefix_cache(model)
    short, other, long = torch.arange(3, 20), torch.arange(40, 57), torch.arange(3, 60)
    size = prefix_cache.cache_bytes(_prefix_cache(model, short))
    assert size > 0 and prefix_cache.cache_bytes(_prefix_cache(model, long)) > 3 * size
    clear_prefix_cache(model)
    monkeypatch.setattr(prefix_cache, "MAX_PREFIX_BYTES", 2 * size + size // 2)  # room for two of the short ones
    first, second = _prefix_cache(model, short), _prefix_cache(model, other)
    assert _prefix_cache(model, short) is first and _prefix_cache(model, other) is second  # both kept
    _prefix_cache(model, short)  # now the most recently used
    _prefix_cache(model, torch.arange(70, 87))  # a third: over the bytes, so the least recently used goes
    assert _prefix_cache(model, short) is first and _prefix_cache(model, other) is not second
    assert _prefix_cache(model, long) is not _prefix_cache(model, long)  # too large alone: used, never kept
    assert _prefix_cache(model, short) is first
    clear_prefix_cache(model)


def test_a_sliding_window_shorter_than_the_prompt_disables_the_cache():
    model, tok = tiny_model_for_bytes("mistral"), byte_tokenizer()
    rows = _rows(tok, [FMT.render(q) for q in QUESTIONS])
    model.config.sliding_window = 16
    try:
        assert prefix_layout(model, rows, tok.pad_token_id).prefix_len == 0
    finally:
        model.config.sliding_window = None


def test_callers_callbacks_see_their_own_sequence_through_the_cached_prefix(tiny):
    """User criteria and processors get the cached path too, and see exactly what a plain call shows them."""
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class TwoPastThePrompt(StoppingCriteria):
        def __init__(self, width):
            self.width, self.seen = width, []

        def __call__(self, input_ids, scores, **kwargs):
            self.seen.append(input_ids.clone())
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.width + 2, dtype=torch.bool)

    class BanFirstPromptToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[torch.arange(len(scores)), input_ids[:, -1]] = -float("inf")  # no token twice in a row
            return scores

    model, tok = tiny
    profile = PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT)
    enc = tok([FMT.render(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1]
    runs = []
    for reuse in (False, True):
        criterion = TwoPastThePrompt(width)
        patcher = AutoPatcher(model, tok, profile, AlwaysPatch(), reuse_prefix=reuse)
        out = patcher.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               stopping_criteria=StoppingCriteriaList([criterion]),
                               logits_processor=LogitsProcessorList([BanFirstPromptToken()]))
        runs.append((out, criterion.seen))
    (plain, plain_seen), (cached, cached_seen) = runs
    assert torch.equal(plain, cached) and plain.shape[1] == width + 2
    assert len(plain_seen) == len(cached_seen) and all(torch.equal(a, b) for a, b in zip(plain_seen, cached_seen))
    assert torch.equal(cached_seen[0][:, :width], enc.input_ids)  # the caller's prompt, not the layout


def test_gate_features_are_the_same_through_the_cached_prefix():
    """extract_features runs one forward from the cached prefix; states and logits match a plain forward."""
    from autopatch.patcher import AutoPatcher as Patcher

    model, tok = tiny_model_for_bytes("qwen2"), byte_tokenizer()
    patcher = Patcher(model, tok, PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT), AlwaysPatch())
    enc = patcher.encode(QUESTIONS)
    results = []
    for reuse in (False, True):
        with patcher.prefill(enc.input_ids, enc.attention_mask, [0, 2], QUESTIONS, reuse_prefix=reuse) as pre:
            logits = pre.forward(model, enc.input_ids, enc.attention_mask, logits_to_keep=1).logits[:, -1]
        results.append((logits, pre.states))
    (plain_logits, plain_states), (cached_logits, cached_states) = results
    torch.testing.assert_close(plain_logits, cached_logits, atol=1e-4, rtol=1e-4)
    for layer in (0, 2):
        torch.testing.assert_close(plain_states[layer], cached_states[layer], atol=1e-4, rtol=1e-4)


def test_a_single_row_uses_only_a_prefix_seen_before():
    from autopatch.prefix_cache import register_prefix

    model, tok = tiny_model_for_bytes("llama", seed=7), byte_tokenizer()
    clear_prefix_cache(model)
    row = _rows(tok, [FMT.render(QUESTIONS[0])])
    assert prefix_layout(model, row, tok.pad_token_id).prefix_len == 0  # its own start alone: a second forward
    AutoPatcher(model, tok, PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT))  # registers FMT's start
    reused = prefix_layout(model, row, tok.pad_token_id)
    assert reused.prefix_len >= MIN_PREFIX_TOKENS
    assert row[0][: reused.prefix_len].tolist() == reused.input_ids[0, : reused.prefix_len].tolist()
    other = _rows(tok, ["Some text in another format entirely, long enough to matter."])
    assert prefix_layout(model, other, tok.pad_token_id).prefix_len == 0
    register_prefix(model, [1, 2, 3])  # shorter than MIN_PREFIX_TOKENS: not worth a cache
    ids, mask = left_pad(row, tok.pad_token_id)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    cached = model.generate(input_ids=reused.input_ids, attention_mask=reused.attention_mask,
                            **reused.generate_kwargs(model), **kwargs)[:, reused.width:]
    assert torch.equal(plain, cached)


def test_a_lone_row_reuses_the_start_it_shares_with_a_recent_lone_row():
    """A client's fixed system prompt: computed on its second request, reused after, with the plain path's tokens;
    a shared start fewer than MIN_PREFIX_TOKENS past a registered one is not worth its own forward call."""
    from autopatch.prefix_cache import register_prefix

    model, tok = tiny_model_for_bytes("llama", seed=7), byte_tokenizer()
    clear_prefix_cache(model)
    system = "You answer travel questions for an agency, in one short line.\n\n"
    first, second, third = _rows(tok, [system + "Where is Rome?", system + "Who built the Colosseum?", "Short one."])
    assert prefix_layout(model, [first], tok.pad_token_id).prefix_len == 0  # nothing seen before
    lay = prefix_layout(model, [second], tok.pad_token_id)
    assert lay.prefix_len == shared_prefix_len([first, second]) >= len(system)
    ids, mask = left_pad([second], tok.pad_token_id)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    cached = model.generate(input_ids=lay.input_ids, attention_mask=lay.attention_mask,
                            **lay.generate_kwargs(model), **kwargs)[:, lay.width:]
    assert torch.equal(plain, cached)
    assert prefix_layout(model, [third], tok.pad_token_id).prefix_len == 0  # it shares nothing with them
    assert prefix_layout(model, [third], tok.pad_token_id).prefix_len == 0  # nor with itself: a repeat, no template
    assert prefix_layout(model, [second], tok.pad_token_id, protect=[MIN_PREFIX_TOKENS - 1]).prefix_len == 0
    clear_prefix_cache(model)  # forgets the rows too
    assert prefix_layout(model, [second], tok.pad_token_id).prefix_len == 0
    register_prefix(model, first[: len(system) - 4].tolist())  # most of it registered: the rest is not worth a call
    assert prefix_layout(model, [first], tok.pad_token_id).prefix_len == len(system) - 4
    clear_prefix_cache(model)


def test_a_longer_prefix_extends_the_cached_one_and_equals_one_computed_whole():
    """A batch's shared prefix runs only its tokens past a cached (or registered) prefix, on a copy of that cache."""
    from autopatch.prefix_cache import register_prefix

    model = tiny_model_for_bytes("llama", seed=7)
    clear_prefix_cache(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        register_prefix(model, list(range(3, 15)))
        longer = _prefix_cache(model, torch.arange(3, 20))
        assert calls == [12, 5]  # the registered prefix once, then only the 5 tokens past it
        base = _prefix_cache(model, torch.arange(3, 15))
        assert base.get_seq_length() == 12 and longer.get_seq_length() == 17  # the base was copied, not extended
        calls.clear()
        _prefix_cache(model, torch.arange(3, 22))
        assert calls == [2]  # the longest cached prefix is the base
    finally:
        handle.remove()
    clear_prefix_cache(model)
    whole = _prefix_cache(model, torch.arange(3, 20))
    for layer in range(len(whole.layers)):
        assert torch.allclose(whole.layers[layer].keys, longer.layers[layer].keys, atol=1e-5)
        assert torch.allclose(whole.layers[layer].values, longer.layers[layer].values, atol=1e-5)
    clear_prefix_cache(model)


def test_a_batch_invariant_model_splits_a_row_where_it_splits_alone():
    """With the row-invariant attention on (the bfloat16 modes), a row's prefix is the registered format start
    whatever its batch mates share or what was cached before; a batch of several formats reuses none."""
    from autopatch.invariance import row_invariant_attention

    model, tok = tiny_model_for_bytes("llama", seed=8), byte_tokenizer()
    model.set_attn_implementation("sdpa")
    clear_prefix_cache(model)
    same_start = _rows(tok, [FMT.render(q) for q in ("What is the capital of France?", "What is the capital of Peru?")])
    shared = prefix_layout(model, same_start, tok.pad_token_id).prefix_len  # the batch's own shared start: longer
    AutoPatcher(model, tok, PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT))  # registers FMT's start
    registered = len(FMT.fixed_prefix(tok))
    assert shared > registered
    row_invariant_attention(model)
    try:
        alone = prefix_layout(model, same_start[:1], tok.pad_token_id).prefix_len
        together = prefix_layout(model, same_start, tok.pad_token_id).prefix_len
        other = _rows(tok, ["Some text in another format entirely, long enough to matter."])
        mixed = prefix_layout(model, [same_start[0], *other], tok.pad_token_id).prefix_len
    finally:
        row_invariant_attention(model, on=False)
    assert alone == together == registered and mixed == 0
    assert prefix_layout(model, same_start, tok.pad_token_id).prefix_len == shared  # off again: the shared start


def test_a_patcher_without_the_prefix_cache_reuses_no_prefix_in_any_call_it_makes(monkeypatch):
    """reuse_prefix=False: plain batches everywhere, the decomposer's proposals and the strategies' calls included."""
    import autopatch.prefix_cache as prefix_cache
    from autopatch.prefix_cache import bypassed

    model, tok = tiny_model_for_bytes("llama", seed=9), byte_tokenizer()
    clear_prefix_cache(model)
    computed: list[int] = []
    real = prefix_cache._prefix_cache
    monkeypatch.setattr(prefix_cache, "_prefix_cache", lambda m, prefix: computed.append(len(prefix)) or real(m, prefix))
    profile = PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    outs = {}
    for reuse in (True, False):
        patcher = AutoPatcher(model, tok, profile, AlwaysPatch(), reuse_prefix=reuse, decomposer="model")
        computed.clear()
        outs[reuse] = [patcher.generate(**tok([FMT.render(q)], return_tensors="pt"), **kwargs) for q in QUESTIONS]
        assert bool(computed) == reuse
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
    row = _rows(tok, [FMT.render(QUESTIONS[0])])
    with bypassed():
        assert prefix_layout(model, row, tok.pad_token_id).prefix_len == 0
    assert prefix_layout(model, row, tok.pad_token_id).prefix_len > 0  # the registered start, outside it
    clear_prefix_cache(model)


def test_a_new_quantization_mode_forgets_the_keys_and_values_computed_in_the_old_one_not_the_registered_starts():
    """Keys and values cached under one mode's arithmetic are not the other's (int8 activations round every
    matmul's input): apply_mode drops them; the starts a format registered stay declared."""
    from autopatch import prefix_cache
    from autopatch.quantize import QUANT_MODES, apply_mode, quantize_model

    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    quantize_model(model, "int4")
    start = tok(FMT.render(QUESTIONS[0]), return_tensors="pt").input_ids[0, : MIN_PREFIX_TOKENS + 4]
    prefix_cache.register_prefix(model, start.tolist())
    _prefix_cache(model, start)
    assert prefix_cache._store.get(model)
    apply_mode(model, QUANT_MODES["int4-q8"])
    assert not prefix_cache._store.get(model) and prefix_cache._known.get(model)
    clear_prefix_cache(model)
