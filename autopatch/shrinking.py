"""Greedy batches where finished rows leave: ``model.generate`` in rounds, each over the rows still running.

Example:
    >>> from autopatch.shrinking import shrinking_generate
    >>> out = shrinking_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    >>> torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False))
    True

A batch of answers of different lengths (a two-hop answer of two tokens beside one that runs to its budget)
makes ``model.generate`` carry every finished row to the end, each step at the full batch's cost. Here,
once at least half of the running rows have finished, the round stops; the next round continues the others
from the same KV cache (:meth:`transformers.Cache.batch_select_indices`), with the budget that is left. The
output is the one ``model.generate`` gives: finished rows padded with the pad token up to the longest row.

Callbacks see what ``model.generate`` would show them: in a later round, the caller's logits processors and
stopping criteria get the whole batch (finished rows padded, as ``generate`` pads them) and answer for the
running rows only. Only the calls this is exact for take rounds: greedy, one sequence per prompt, tensor output,
no streamer, ``max_new_tokens`` given, and none of the generation settings that count from the start of a call
(``min_new_tokens`` and the like), and no capture or patch of this thread acting on every forward call
(:func:`autopatch.engine.acts_on_every_call`). Every other call is ``model.generate`` itself. The engine's
contexts act on the first forward call (the prefill) by default, which stays in the first round.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from autopatch.engine import acts_on_every_call
from autopatch.prefix_cache import cache_argument

__all__ = ["shrinking_generate"]

MIN_BUDGET_LEFT = 2  # a round ends early only when at least this many steps are left to save
# Arguments that make a call other than a greedy, tensor-output batch: such calls run as ``model.generate``.
_OTHER_CALLS = ("streamer", "assistant_model", "prefix_allowed_tokens_fn", "stop_strings", "max_length",
                "negative_prompt_ids", "negative_prompt_attention_mask", "synced_gpus")


def shrinking_generate(model: Any, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       logits_processor: LogitsProcessorList | None = None,
                       stopping_criteria: StoppingCriteriaList | None = None, **kwargs) -> Any:
    """``model.generate(input_ids=..., attention_mask=..., ...)``, with finished rows leaving the batch."""
    config = _effective_config(model, kwargs)
    eos_ids = _ids(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else _first(config.eos_token_id)
    key = cache_argument(model)
    if key != "past_key_values" and kwargs.get("past_key_values") is not None and kwargs.get(key) is None:
        kwargs[key] = kwargs.pop("past_key_values")  # the older name of the same argument
    if not _restartable(input_ids, kwargs, config) or pad is None or not eos_ids or attention_mask is None \
            or not _selectable_cache(model, kwargs.get(key)) or acts_on_every_call(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=logits_processor,
                              stopping_criteria=stopping_criteria, **kwargs)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=input_ids.device)
    batch = input_ids.shape[0]
    budget = int(kwargs.pop("max_new_tokens"))
    running = list(range(batch))
    finished: dict[int, torch.Tensor] = {}
    ids, mask = input_ids, attention_mask
    whole = _WholeBatch(batch, running, finished, pad)
    while True:
        views = whole if len(running) < batch else None
        halt = _RoundEnd(_viewed(stopping_criteria, views), eos, budget)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget,
                             logits_processor=_viewed(logits_processor, views),
                             stopping_criteria=StoppingCriteriaList([halt]), return_dict_in_generate=True, **kwargs)
        steps = out.sequences.shape[1] - ids.shape[1]
        if not halt.ended_early:
            for k, row in enumerate(running):
                finished[row] = out.sequences[k]
            break
        keep = []
        for k, (row, done) in enumerate(zip(running, cast(torch.Tensor, halt.done).tolist())):
            if done:
                finished[row] = out.sequences[k]
            else:
                keep.append(k)
        index = torch.tensor(keep, dtype=torch.long, device=out.sequences.device)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.24
        cache.batch_select_indices(index)
        running[:] = [running[k] for k in keep]  # in place: ``whole`` reads the same list
        ids = out.sequences[index]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], dim=1)[index]
        kwargs[key] = cache
        budget -= steps
    length = max(len(seq) for seq in finished.values())
    result = torch.full((batch, length), pad, dtype=input_ids.dtype, device=input_ids.device)
    for row, seq in finished.items():
        result[row, : len(seq)] = seq
    return result


def _first(value: int | Sequence[int] | None) -> int | None:
    """The pad token ``generate`` falls back to: the (first) EOS token."""
    if value is None or isinstance(value, int):
        return value
    return int(list(value)[0]) if len(value) else None


def _ids(value: int | Sequence[int] | None) -> set[int]:
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def _effective_config(model: Any, kwargs: dict) -> GenerationConfig:
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    return config


def _restartable(input_ids: torch.Tensor, kwargs: dict, config: GenerationConfig) -> bool:
    """Whether a call may run in rounds and give exactly ``model.generate``'s output."""
    if input_ids.shape[0] < 2 or kwargs.get("max_new_tokens") is None or any(kwargs.get(k) is not None
                                                                               for k in _OTHER_CALLS):
        return False
    if config.do_sample or (config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1:
        return False
    if config.return_dict_in_generate or config.output_scores or config.output_logits or config.use_cache is False \
            or config.cache_implementation is not None:  # a static cache cannot drop rows
        return False
    counted_from_the_start = (config.min_new_tokens, config.min_length, config.begin_suppress_tokens,
                              config.forced_bos_token_id, config.exponential_decay_length_penalty,
                              config.watermarking_config)
    return not any(counted_from_the_start) and (getattr(config, "guidance_scale", None) or 1) == 1


def _selectable_cache(model: Any, given: Any) -> bool:
    """Whether the KV cache this call will use can drop rows: the one given, else the dynamic cache ``generate``
    builds for most models (not for recurrent or hybrid ones, which bring their own)."""
    if given is not None:
        return callable(getattr(given, "batch_select_indices", None))
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    return bool(supports()) if callable(supports) else True


class _WholeBatch:
    """The whole batch as ``model.generate`` would show it, from a later round's running rows."""

    def __init__(self, batch: int, running: list[int], finished: dict[int, torch.Tensor], pad: int):
        self.batch, self.running, self.finished, self.pad = batch, running, finished, pad

    def ids(self, running_ids: torch.Tensor) -> torch.Tensor:
        full = torch.full((self.batch, running_ids.shape[1]), self.pad, dtype=running_ids.dtype,
                          device=running_ids.device)
        for row, seq in self.finished.items():
            full[row, : min(len(seq), full.shape[1])] = seq[: full.shape[1]]
        full[self.running] = running_ids
        return full

    def scores(self, running_scores: torch.Tensor | None) -> torch.Tensor | None:
        if running_scores is None:
            return None
        full = running_scores.new_zeros((self.batch, running_scores.shape[1]))
        full[self.running] = running_scores
        return full


class _ProcessorOnWhole(LogitsProcessor):
    def __init__(self, inner: Any, whole: _WholeBatch):
        self.inner, self.whole = inner, whole

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.inner(self.whole.ids(input_ids), self.whole.scores(scores))[self.whole.running]


class _CriterionOnWhole(StoppingCriteria):
    def __init__(self, inner: Any, whole: _WholeBatch):
        self.inner, self.whole = inner, whole

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        flags = self.inner(self.whole.ids(input_ids), self.whole.scores(scores), **kwargs)
        return cast(torch.BoolTensor, flags[self.whole.running] if isinstance(flags, torch.Tensor) and flags.dim() else flags)


def _viewed(callbacks, whole: _WholeBatch | None):
    if not callbacks or whole is None:
        return callbacks
    view = _ProcessorOnWhole if isinstance(callbacks, LogitsProcessorList) else _CriterionOnWhole
    return type(callbacks)([view(c, whole) for c in callbacks])


class _RoundEnd(StoppingCriteria):
    """The caller's criteria and EOS, per row; and the whole round's end once half of its rows are done."""

    def __init__(self, criteria: StoppingCriteriaList | None, eos: torch.Tensor, budget: int):
        self.criteria, self.eos, self.budget = criteria, eos, budget
        self.steps = 0
        self.done: torch.Tensor | None = None
        self.ended_early = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        flags = torch.isin(input_ids[:, -1], self.eos)
        if self.criteria:
            flags = flags | self.criteria(input_ids, scores, **kwargs).to(flags.device)
        self.done = flags if self.done is None else self.done | flags
        finished = int(self.done.sum())
        if 0 < finished < len(self.done) and 2 * finished >= len(self.done) and self.budget - self.steps >= MIN_BUDGET_LEFT:
            self.ended_early = True
            return cast(torch.BoolTensor, torch.ones_like(flags))
        return cast(torch.BoolTensor, flags)
