"""Batch-invariant attention: each row of a batch attends over its own tokens only, exactly as it would alone.

Example:
    >>> from autopatch.invariance import set_batch_invariant
    >>> set_batch_invariant(model)                 # True in a -bf16 or -q8 mode with SDPA attention
    >>> model.config._attn_implementation
    'autopatch_rows'
    >>> set_batch_invariant(model, on=False)       # back to torch's SDPA and the faster, batch-dependent prefill

Why: a left-padded row runs torch's attention kernel over its pad keys too. They are masked and add exact zeros, but
they shift where the row's own keys fall in the kernel's blocks and vector lanes, so its sums round differently now
and then. Under a bfloat16 prefill (:mod:`autopatch.quantize`'s ``-bf16`` modes) the next matmul rounds its input to
bfloat16, which turns such a last-bit difference into a visible one: the server's batched answers differed from the
same requests' lone answers in 4 of 32 (``bench/bench_server.py``). Here each row's attention is one SDPA call on the
queries and keys that are its own, with the mask a lone prompt gets (none where the causal pattern is all it says),
on contiguous copies, so the call is the one the row makes alone. With the bfloat16 GEMM's fixed blocks
(:data:`autopatch.kernels.GEMM_BLOCK`) and the float32 kernel's fixed order, a forward pass is then batch-invariant.
It costs an SDPA call per row instead of one per batch. A batch whose rows' own queries are not each one run at the
end (right padding, packed sequences) takes torch's whole-batch call.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["ROWS", "batch_invariant", "row_invariant_attention", "set_batch_invariant"]

ROWS = "autopatch_rows"  # the attention implementation's name in transformers' registry
_BASE = "sdpa"


@dataclass(frozen=True)
class _Row:
    """One row's own part of a batch: its first own query, its own keys (a slice when they are one run, as after
    left padding; else their indices) and the mask its lone call gets (``None`` where SDPA's causal flag says it)."""

    first_query: int
    keys: slice | torch.Tensor
    mask: torch.Tensor | None


def _rows(mask: torch.Tensor) -> list[_Row] | None:
    """Each row's :class:`_Row`, read from a 4-D attention mask ``[batch, 1, q, k]`` whose queries are the last ``q`` of
    the ``k`` positions; ``None`` where a row's own queries are not one run at the end (right padding, packed
    sequences).

    A pad query does not see its own position (transformers masks pad keys), or, in versions that spare SDPA a NaN,
    sees every key, later ones included. A row's own keys are those some own query sees: the pads between a cached
    prefix and a row's suffix (:mod:`autopatch.prefix_cache`'s layout) drop out with the left padding."""
    if mask.shape[1] != 1:
        return None
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
    q_len, k_len = allowed.shape[-2:]
    later = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).triu(k_len - q_len + 1)
    own_position = allowed[:, torch.arange(q_len), torch.arange(k_len - q_len, k_len)]  # [batch, q]
    pads = ~own_position | (allowed & later).any(dim=-1)
    rows = []
    for i, (row_pads, row) in enumerate(zip(pads, allowed)):
        first_query = int((~row_pads).int().argmax())
        if bool(row_pads[first_query:].any()):
            return None
        index = row[first_query:].any(dim=0).nonzero().flatten()
        first, count = int(index[0]), len(index)
        keys: slice | torch.Tensor = slice(first, k_len) if first + count == k_len else index
        queries = q_len - first_query
        # transformers' own rule for leaving SDPA's mask out (then it is causal, aligned at the start): a lone
        # prompt's call has none then either
        causal = (queries == 1 or queries == count) and _causal(row[first_query:][:, keys], count - queries)
        rows.append(_Row(first_query, keys, None if causal else mask[i : i + 1, :, first_query:][..., keys].contiguous()))
    return rows


_RECENT = threading.local()  # the masks of this thread's current forward pass: every layer gets one of the same few


def _rows_of(mask: torch.Tensor) -> list[_Row] | None:
    """:func:`_rows`, read once per mask: a forward pass hands the same mask to every layer of a kind."""
    recent = getattr(_RECENT, "masks", None)
    if recent is None:
        recent = _RECENT.masks = []
    for ref, rows in recent:
        if ref() is mask:
            return rows
    rows = _rows(mask)
    recent.insert(0, (weakref.ref(mask), rows))
    del recent[2:]  # full and sliding-window layers: two masks a pass
    return rows


def _causal(allowed: torch.Tensor, offset: int) -> bool:
    """Whether ``allowed`` (bool ``[q, k]``) says only "query i sees keys up to i + offset" (as ``None`` would)."""
    q, k = allowed.shape
    return bool((allowed == torch.ones(q, k, dtype=torch.bool, device=allowed.device).tril(offset)).all())


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    batch, _, q_len, _ = query.shape
    rows = [_Row(0, slice(0, None), None)] * batch if attention_mask is None else _rows_of(attention_mask)
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = query.new_zeros(batch, q_len, query.shape[1], value.shape[-1])  # a pad query's output: zeros
    for i, row in enumerate(rows):
        keys, values = key[i : i + 1, :, row.keys], value[i : i + 1, :, row.keys]
        part, _ = sdpa_attention_forward(module, query[i : i + 1, :, row.first_query :].contiguous(), keys.contiguous(),
                                         values.contiguous(), row.mask, **kwargs)
        out[i, row.first_query :] = part[0]
    return out, None


AttentionInterface.register(ROWS, _attention)
AttentionMaskInterface.register(ROWS, sdpa_mask)  # the masks SDPA gets; without one, transformers makes none at all


def row_invariant_attention(model: Any, on: bool = True) -> None:
    """Switch ``model``'s attention to the row-invariant one (``on``) or back to torch's SDPA. A model whose
    attention is something else (eager, say, for attention weights) is left as it is."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in (_BASE, ROWS):
        return
    wanted = ROWS if on else _BASE
    if current != wanted:
        model.set_attn_implementation(wanted)


def batch_invariant(model: Any) -> bool:
    """Whether ``model`` runs the row-invariant attention (a bfloat16-prefill mode): then anything else that shapes a
    row's computation by its batch (:mod:`autopatch.prefix_cache`'s split point) must not either."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ROWS


def set_batch_invariant(model: Any, on: bool = True) -> bool:
    """Make ``model``'s answers independent of its batch (``on``), or go back to the faster batch-dependent path;
    returns whether it is on. Needs a mode whose matmuls round their inputs (a bfloat16 prefill: ``int4-bf16``,
    ``int8-bf16``; int8 activations for every matmul: ``int4-q8``, ``int8-q8``), which turns attention's last-bit differences into
    visible ones, and SDPA attention; elsewhere it changes nothing and returns ``False``.

    On: attention runs per row (:func:`row_invariant_attention`) and the prefix cache reuses only a registered start
    (:mod:`autopatch.prefix_cache`); in a bfloat16-prefill mode every call of two positions or more also multiplies
    in the bfloat16 GEMM's fixed blocks (:data:`autopatch.kernels.GEMM_BLOCK`), which costs prefill time, most on
    short calls, which then pay the bfloat16 path's dequantizing instead of the float32 kernel
    (docs/quantization.md). The int8-activation kernels round each row on its own at any row count already.
    """
    from autopatch.kernels import Q8
    from autopatch.quantize import PackedLinear

    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    sdpa = getattr(getattr(model, "config", None), "_attn_implementation", None) in (_BASE, ROWS)
    kinds = {m.prefill for m in packed}
    # all of it or none: half would not do (a -q8 mode keeping some inputs float32 multiplies those by batch size)
    on = on and sdpa and (torch.bfloat16 in kinds or kinds == {Q8})
    for module in packed:
        module.invariant = on
    row_invariant_attention(model, on=on)
    return on
