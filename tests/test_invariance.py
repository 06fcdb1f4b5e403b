"""autopatch.invariance: each row's attention is the call it makes alone, whatever its batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from autopatch.invariance import ROWS, _attention, row_invariant_attention
from tests.tiny_models import tiny_model

# Bit-for-bit comparisons of whole forward passes across batch shapes: the tiny models' float32 Linears run torch's
# GEMM, which on two threads splits its sums by the call's row count (only the attention is made row-invariant here).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Attention(nn.Module):
    is_causal = True
    num_key_value_groups = 1


def _left_padded_mask(pads: list[int], q_len: int, k_len: int) -> torch.Tensor:
    """transformers' SDPA mask for left padding: query i (position k_len - q_len + i) sees its own earlier tokens;
    a pad query sees nothing."""
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]
    k_pos = torch.arange(k_len)[None, :]
    rows = [(k_pos <= q_pos) & (k_pos >= pad) & (q_pos >= pad) for pad in pads]
    return torch.stack(rows)[:, None]


def _qkv(batch: int, q_len: int, k_len: int, heads: int = 2, dim: int = 256):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, heads, q_len, dim, generator=g), torch.randn(batch, heads, k_len, dim, generator=g),
            torch.randn(batch, heads, k_len, dim, generator=g))


def test_a_padded_rows_prefill_attention_is_its_lone_call_exactly():
    pads, length = [0, 5, 23, 1, 40, 9], 70
    q, k, v = _qkv(len(pads), length, length)
    mask = _left_padded_mask(pads, length, length)
    module = _Attention()
    rows, _ = _attention(module, q, k, v, mask, scaling=0.0625)
    whole, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.0625)
    differs = False
    for i, pad in enumerate(pads):
        alone, _ = sdpa_attention_forward(module, q[i : i + 1, :, pad:].contiguous(), k[i : i + 1, :, pad:].contiguous(),
                                          v[i : i + 1, :, pad:].contiguous(), None, scaling=0.0625)
        assert torch.equal(rows[i, pad:], alone[0])
        assert not rows[i, :pad].any()  # a pad query's output: zeros
        assert torch.allclose(whole[i, pad:], alone[0], atol=1e-5)
        differs |= not torch.equal(whole[i, pad:], alone[0])
    assert differs  # torch's whole-batch call rounds a padded row's sums differently: what this module is for


def test_a_decode_step_over_a_padded_cache_attends_over_each_rows_own_keys():
    pads, k_len = [0, 7, 30], 64
    q, k, v = _qkv(len(pads), 1, k_len)
    rows, _ = _attention(_Attention(), q, k, v, _left_padded_mask(pads, 1, k_len))
    for i, pad in enumerate(pads):
        alone, _ = sdpa_attention_forward(_Attention(), q[i : i + 1].contiguous(), k[i : i + 1, :, pad:].contiguous(),
                                          v[i : i + 1, :, pad:].contiguous(), None)
        assert torch.equal(rows[i], alone[0])


def test_a_mask_that_is_not_left_padding_takes_the_whole_batch_call():
    q, k, v = _qkv(2, 12, 12)
    mask = _left_padded_mask([0, 0], 12, 12)
    mask[1, 0, 8:] = False  # row 1 right-padded: its last queries are pads
    mask[1, 0, :, 8:] = False
    rows, _ = _attention(_Attention(), q, k, v, mask)
    whole, _ = sdpa_attention_forward(_Attention(), q, k, v, mask)
    assert torch.equal(rows, whole)


def test_a_mask_beyond_the_causal_pattern_goes_with_the_row():
    """A sliding window, or a hole among a row's own keys: the row's call gets its own part of the mask."""
    pads, length, window = [0, 6], 40, 8
    q, k, v = _qkv(len(pads), length, length)
    band = torch.arange(length)[:, None] - torch.arange(length)[None, :] < window
    mask = _left_padded_mask(pads, length, length) & band
    mask[1, 0, 30:, 25] = False
    rows, _ = _attention(_Attention(), q, k, v, mask)
    for i, pad in enumerate(pads):
        own = mask[i : i + 1, :, pad:, pad:].contiguous()
        alone, _ = sdpa_attention_forward(_Attention(), q[i : i + 1, :, pad:].contiguous(),
                                          k[i : i + 1, :, pad:].contiguous(), v[i : i + 1, :, pad:].contiguous(), own)
        assert torch.equal(rows[i, pad:], alone[0])


def test_switching_a_model_on_and_off_and_leaving_eager_models_alone():
    model = tiny_model("qwen2")
    assert model.config._attn_implementation == "eager"
    row_invariant_attention(model)
    assert model.config._attn_implementation == "eager"  # attention weights asked for: not ours to change
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 90, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :2] = 0, 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        row_invariant_attention(model)
        assert model.config._attn_implementation == ROWS
        rows = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        alone = [model(input_ids=ids[i : i + 1, int(mask[i].argmax()) :]).logits[0, -1] for i in range(3)]
    assert torch.allclose(rows, plain, atol=1e-5)
    assert all(torch.equal(a, rows[i, -1]) for i, a in enumerate(alone))
    row_invariant_attention(model, on=False)
    assert model.config._attn_implementation == "sdpa"


def test_queries_after_a_cached_prefix_keep_their_mask_and_see_the_prefix():
    """Several queries after cached keys (the prefix cache's suffix): SDPA's causal flag would align them at the
    start, so the mask stays; each row equals its lone call with the same mask, and the right attention."""
    pads, q_len, k_len = [0, 4], 5, 30
    q, k, v = _qkv(len(pads), q_len, k_len)
    mask = _left_padded_mask(pads, q_len, k_len)
    rows, _ = _attention(_Attention(), q, k, v, mask)
    for i, pad in enumerate(pads):
        own = mask[i : i + 1, :, :, pad:].contiguous()
        alone, _ = sdpa_attention_forward(_Attention(), q[i : i + 1].contiguous(), k[i : i + 1, :, pad:].contiguous(),
                                          v[i : i + 1, :, pad:].contiguous(), own)
        assert torch.equal(rows[i], alone[0])
        scores = (q[i] @ k[i, :, pad:].transpose(-1, -2)) / 16 + torch.where(own[0], 0.0, float("-inf"))
        assert torch.allclose(rows[i].transpose(0, 1), scores.softmax(-1) @ v[i, :, pad:], atol=1e-5)


def test_the_pads_between_a_cached_prefix_and_a_rows_suffix_drop_out():
    """autopatch.prefix_cache lays a batch out as [prefix | left padding | suffix]: a row attends over its prefix and
    its suffix, exactly as the same row alone ([prefix | suffix]) does."""
    prefix, width, suffixes = 20, 9, [9, 4, 6]
    k_len = prefix + width
    q, k, v = _qkv(len(suffixes), width, k_len)
    q_pos, k_pos = torch.arange(prefix, k_len)[:, None], torch.arange(k_len)[None, :]
    mask = torch.stack([(k_pos <= q_pos) & ((k_pos < prefix) | (k_pos >= k_len - n)) for n in suffixes])[:, None]
    rows, _ = _attention(_Attention(), q, k, v, mask)
    for i, n in enumerate(suffixes):
        own = torch.cat((torch.arange(prefix), torch.arange(k_len - n, k_len)))
        alone_mask = _left_padded_mask([0], n, prefix + n)
        alone, _ = sdpa_attention_forward(_Attention(), q[i : i + 1, :, width - n :].contiguous(), k[i : i + 1, :, own],
                                          v[i : i + 1, :, own], alone_mask)
        assert torch.equal(rows[i, width - n :], alone[0])
        assert not rows[i, : width - n].any()
