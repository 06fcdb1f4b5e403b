"""Step 4 of a call: lay out, patch and generate a batch of targets, and merge them into the caller's output.

Example:
    >>> out, width = run_targets(model, tok, targets, max_new_tokens=16)     # one left-padded, patched generate
    >>> merged = continue_patched(model, tok, main, targets, caller_width, max_new_tokens=16)

:func:`run_targets` is the one place a batch of prompts is laid out (left padding, the shared prefix from
:mod:`autopatch.prefix_cache`) and generated with its patches (:func:`autopatch.engine.patch`): the patched
rows of ``AutoPatcher.generate``, the bridges of ``verbalize``, the model's proposed decompositions and the
harness's baselines all go through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from autopatch.datatypes import Target
from autopatch.engine import PatchEdit, patch
from autopatch.merging import TargetStreamer, caller_views, merge_outputs
from autopatch.prefix_cache import prefix_layout
from autopatch.shrinking import shrinking_generate

__all__ = ["continue_patched", "run_targets", "token_budget"]


@torch.no_grad()
def run_targets(model: torch.nn.Module, tok: PreTrainedTokenizerBase, targets: Sequence[Target], *,
                reuse_prefix: bool = True, caller_ids: torch.Tensor | None = None, **generate_kwargs):
    """Generate from every target in one batch, patching each prefill as planned; returns ``(output, width)``.

    The targets' shared prefix (the format's demonstrations) comes from :mod:`autopatch.prefix_cache`'s cache
    unless ``reuse_prefix=False``; new tokens start at ``output[:, width:]`` either way. With ``caller_ids``
    (the callers' padded prompts, one row per target), ``logits_processor`` and ``stopping_criteria`` see
    those prompts followed by the generated tokens instead of the target prompts.
    """
    edits = [(i, layer, pos, vec) for i, t in enumerate(targets) for layer, pos, vec in t.edits]
    lay = prefix_layout(model, [t.input_ids for t in targets], tok.pad_token_id, enabled=reuse_prefix,
                        protect=[pos if pos >= 0 else len(targets[i].input_ids) + pos for i, _, pos, _ in edits])
    device = next(model.parameters()).device
    generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
    if caller_ids is not None:
        for name in ("logits_processor", "stopping_criteria"):
            generate_kwargs[name] = caller_views(generate_kwargs.get(name), caller_ids, lay.width)
    engine_edits = [PatchEdit(layer, i, lay.engine_position(pos), vec) for i, layer, pos, vec in edits]
    with patch(model, engine_edits, attention_mask=lay.engine_mask):
        return (shrinking_generate(model, input_ids=lay.input_ids.to(device), attention_mask=lay.attention_mask.to(device),
                                   **lay.generate_kwargs(model), **generate_kwargs), lay.width)


def token_budget(config: GenerationConfig, kwargs: dict, width: int) -> int:
    """The new tokens a call may generate: ``max_new_tokens``, else what ``max_length`` leaves after ``width``."""
    if kwargs.get("max_new_tokens") is not None:
        return int(kwargs["max_new_tokens"])
    if kwargs.get("max_length") is not None:
        return max(1, int(kwargs["max_length"]) - width)
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return max(1, int(config.max_length) - width)


def continue_patched(model: torch.nn.Module, tok: PreTrainedTokenizerBase, main: Any, targets: Sequence[Target],
                     width: int, *, caller_ids: torch.Tensor, streamer=None, reuse_prefix: bool = True,
                     **generate_kwargs) -> Any:
    """Generate every target in one batch and put each one's tokens in its row of ``main`` (the unpatched call's
    output, prompts ``width`` wide), so the result reads as one ``model.generate`` output."""
    target_streamer = TargetStreamer(streamer) if streamer is not None else None
    target_out, target_width = run_targets(model, tok, targets, streamer=target_streamer, reuse_prefix=reuse_prefix,
                                           caller_ids=caller_ids, **generate_kwargs)
    return merge_outputs(main, target_out, {t.row: j for j, t in enumerate(targets)}, width, target_width,
                         tok.pad_token_id)
