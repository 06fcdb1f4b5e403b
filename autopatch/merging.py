"""Stitch a patched continuation back into ``generate``'s output, and route streamed tokens.

Example:
    >>> from autopatch.merging import merge_outputs
    >>> merged = merge_outputs(main, target_out, {1: 0}, width, target_width, pad=tok.pad_token_id)
    >>> # row 1 of ``main`` now ends with row 0 of ``target_out``'s answer tokens

Patched rows are answered from a second, patched ``generate`` call over other
prompts; these helpers make the caller see one ordinary ``generate`` result and
one ordinary stream.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria


class GatedStreamer:
    """Forwards the vanilla stream unless the (single) row is patched, then the patched stream."""

    def __init__(self, inner, patched: Callable[[], bool]):
        self.inner, self._patched, self.prompt_sent = inner, patched, False

    def put(self, value) -> None:
        if not self.prompt_sent:
            self.prompt_sent = True
            self.inner.put(value)
        elif not self._patched():
            self.inner.put(value)

    def end(self) -> None:
        if not self._patched():
            self.inner.end()


class _CallerView:
    """Shows a caller's callback the caller's own sequence on a patched row (see :func:`caller_views`)."""

    def __init__(self, inner, caller_ids: torch.Tensor, width: int):
        self.inner, self.caller_ids, self.width = inner, caller_ids, width

    def view(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.caller_ids.to(input_ids.device), input_ids[:, self.width :]], dim=1)


class _ProcessorView(_CallerView, LogitsProcessor):
    def __call__(self, input_ids, scores):
        return self.inner(self.view(input_ids), scores)


class _CriterionView(_CallerView, StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return self.inner(self.view(input_ids), scores, **kwargs)


def caller_views(callbacks, caller_ids: torch.Tensor, width: int):
    """``callbacks`` (a processor or criteria list, or ``None``) seeing the caller's sequence on patched rows.

    A patched row is generated from another prompt; each callback sees ``caller_ids`` (the caller's padded
    prompt of those rows) followed by the tokens generated so far, exactly what it would see in a plain call,
    so length limits and prompt-aware processors behave as the caller wrote them.
    """
    if not callbacks:
        return callbacks
    view = _ProcessorView if isinstance(callbacks, LogitsProcessorList) else _CriterionView
    return type(callbacks)([view(c, caller_ids, width) for c in callbacks])


class TargetStreamer:
    """Drops the target prompt (the caller already saw their own) and forwards the answer."""

    def __init__(self, inner):
        self.inner, self.first = inner, True

    def put(self, value) -> None:
        if self.first:
            self.first = False
            return
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def merge_outputs(main, target_out, target_index: dict[int, int], width: int, target_width: int, pad: int):
    """The caller's prompt plus each row's answer tokens, right-padded with ``pad`` like ``generate`` pads.

    ``target_index`` maps a patched row of ``main`` to its row in ``target_out``; dict outputs also get merged
    ``scores``/``logits`` (finished rows score only the pad token, as ``generate`` does).
    """
    main_seq = main if isinstance(main, torch.Tensor) else main.sequences
    target_seq = target_out if isinstance(target_out, torch.Tensor) else target_out.sequences
    answers = [main_seq[i, width:] for i in range(main_seq.shape[0])]
    for row, j in target_index.items():
        answers[row] = target_seq[j, target_width:]
    length = max(len(a) for a in answers)
    merged = torch.full((main_seq.shape[0], width + length), pad, dtype=main_seq.dtype, device=main_seq.device)
    merged[:, :width] = main_seq[:, :width]
    for i, answer in enumerate(answers):
        merged[i, width : width + len(answer)] = answer.to(merged.device)
    if isinstance(main, torch.Tensor):
        return merged
    out = copy.copy(main)
    out.sequences = merged
    for name in ("scores", "logits"):
        if getattr(main, name, None) is not None and getattr(target_out, name, None) is not None:
            setattr(out, name, _merge_steps(getattr(main, name), getattr(target_out, name), target_index, length, pad))
    for name in ("attentions", "hidden_states", "past_key_values"):
        if getattr(out, name, None) is not None:
            setattr(out, name, None)  # per-step internals of two different prompts cannot be merged
    return out

def _merge_steps(main_steps, target_steps, target_index: dict[int, int], length: int, pad: int):
    batch, vocab = main_steps[0].shape
    filler = torch.full((vocab,), float("-inf"), dtype=main_steps[0].dtype, device=main_steps[0].device)
    filler[pad] = 0.0
    steps = []
    for s in range(length):
        step = main_steps[s].clone() if s < len(main_steps) else filler.expand(batch, vocab).clone()
        for row, j in target_index.items():
            step[row] = target_steps[s][j].to(step.device) if s < len(target_steps) else filler
        steps.append(step)
    return tuple(steps)


def with_continuations(input_ids: torch.Tensor, continuations: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """The prompts followed by given new tokens, right-padded with ``pad_id`` as ``generate`` pads finished rows."""
    width = max((len(c) for c in continuations), default=0)
    new = torch.full((input_ids.shape[0], width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    for i, tokens in enumerate(continuations):
        new[i, : len(tokens)] = torch.as_tensor(list(tokens), dtype=input_ids.dtype)
    return torch.cat([input_ids, new], dim=1)
