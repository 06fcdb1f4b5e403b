"""Shared-prefix KV caching: the prompts of one format share their start, so compute it once.

Example:
    >>> from autopatch.prefix_cache import prefix_layout
    >>> lay = prefix_layout(model, rows, tok.pad_token_id)        # rows: unpadded 1-D id tensors
    >>> out = model.generate(input_ids=lay.input_ids, attention_mask=lay.attention_mask, **lay.generate_kwargs(model))
    >>> new_tokens = out[:, lay.width:]

Every prompt that autopatch renders in one format starts with the same tokens:
the few-shot demonstrations, or the chat template's system turn and
demonstration turns (91 of about 110 tokens for Qwen2.5 with the chat format).
:func:`prefix_layout` finds the longest token prefix that every row of a batch
shares, takes its keys and values from a small per-model cache (computing them
once, with one forward pass of batch 1), and lays the batch out as
``[prefix | left padding | suffix]``: the attention mask hides the padding and
the position ids, which ``generate`` derives from the mask, run on unbroken,
so each row computes exactly what it would alone. Only the suffixes are run.

Positions for :mod:`autopatch.engine` are then counted in the suffix:
:meth:`PrefixLayout.engine_position` and :attr:`PrefixLayout.engine_mask`
translate them, and ``protect=`` keeps every position that will be captured or
patched out of the cached prefix. The prefix is computed before any capture or
patch context opens, so the engine's "first forward call" is still the
prefill of the rows. A lone row reuses a start that is registered (a prompt
format's, :func:`register_prefix`), already cached, or shared with one of the
latest lone rows (a different prompt): a client's fixed system prompt is
computed once, on its second request, and reused after. Falls back to a plain
left-padded batch (``prefix_len == 0``) when the shared prefix is short, when
the model's cache class cannot be built, when the prompt would outgrow a
sliding attention window, or within :func:`bypassed`.
"""

from __future__ import annotations

import copy
import inspect
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import torch

from autopatch.invariance import batch_invariant

MIN_PREFIX_TOKENS = 8  # below this, a cached prefix saves less than its copy costs
MAX_PREFIXES_PER_MODEL = 8
MAX_PREFIX_BYTES = 512 << 20  # keys and values kept per model, at most: a client's long system prompt stays bounded
RECENT_ROWS = 16  # lone rows remembered per model, to find a start that comes back (a client's fixed system prompt)

_lock = threading.Lock()
_store: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict[tuple[int, ...], Any]] = weakref.WeakKeyDictionary()
# Prefixes known to start many prompts (a patcher's prompt format), computed the first time a row starts with one.
_known: weakref.WeakKeyDictionary[torch.nn.Module, set[tuple[int, ...]]] = weakref.WeakKeyDictionary()
# The latest lone rows laid out for each model, newest last: a start two of them share is worth computing once.
_recent: weakref.WeakKeyDictionary[torch.nn.Module, deque[torch.Tensor]] = weakref.WeakKeyDictionary()


_bypassed: ContextVar[bool] = ContextVar("autopatch_prefix_cache_bypassed", default=False)


@contextmanager
def bypassed() -> Iterator[None]:
    """Within it (on this thread or task only), every layout is a plain left-padded batch: no prefix is reused,
    computed or remembered. ``AutoPatcher(reuse_prefix=False)`` runs each call in it, its strategies' and the
    decomposer's own calls included.

    Example:
        >>> with bypassed():
        ...     prefix_layout(model, rows, tok.pad_token_id).prefix_len
        0
    """
    token = _bypassed.set(True)
    try:
        yield
    finally:
        _bypassed.reset(token)


@dataclass(frozen=True)
class PrefixLayout:
    """A batch laid out for ``generate``: ``[prefix | left padding | suffix]``, with the prefix's KV cache."""

    input_ids: torch.Tensor  # (batch, width)
    attention_mask: torch.Tensor  # (batch, width)
    prefix_len: int  # 0: no cached prefix, a plain left-padded batch
    cache: Any = None  # a batch-sized copy of the prefix's cache, or None

    @property
    def width(self) -> int:
        """Where generated tokens start in ``generate``'s output."""
        return int(self.input_ids.shape[1])

    @property
    def engine_mask(self) -> torch.Tensor:
        """The mask over the tokens the first forward call sees (the suffixes), for engine position translation."""
        return self.attention_mask[:, self.prefix_len :]

    def engine_position(self, position: int) -> int:
        """A position of the unpadded row, counted in the suffix the first forward call sees."""
        return position - self.prefix_len if position >= 0 else position

    def generate_kwargs(self, model: torch.nn.Module) -> dict[str, Any]:
        """The cache argument for ``model.generate`` (``cache`` in transformers >= 5.24, else ``past_key_values``)."""
        if self.cache is None:
            return {}
        return {cache_argument(model): self.cache}

    def forward(self, model: torch.nn.Module, **kwargs):
        """One forward pass over the suffixes (the prefix comes from the cache), with the positions ``generate``
        would give them; e.g. ``lay.forward(model, logits_to_keep=1).logits``."""
        device = next(model.parameters()).device
        positions = position_ids(self.attention_mask)[:, self.prefix_len :]
        return model(input_ids=self.input_ids[:, self.prefix_len :].to(device),
                     attention_mask=self.attention_mask.to(device), position_ids=positions.to(device),
                     **self.generate_kwargs(model), **kwargs)

    def caller_sequences(self, sequences: torch.Tensor, caller_ids: torch.Tensor) -> torch.Tensor:
        """``generate``'s output with the caller's own (left-padded) prompt in front of the new tokens."""
        return torch.cat([caller_ids.to(sequences.device), sequences[:, self.width :]], dim=1)


def _forward_takes(model: torch.nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def cache_argument(model: torch.nn.Module) -> str:
    """The name ``model.generate`` and ``model.forward`` take a KV cache under."""
    return "cache" if _forward_takes(model, "cache") else "past_key_values"


def _one_logit(model: torch.nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: a prefix's logits are never read, and on a large vocabulary
    (Gemma's 262,144 tokens) the LM head over every position costs more than the prefix's layers."""
    return {"logits_to_keep": 1} if _forward_takes(model, "logits_to_keep") else {}


def shared_prefix_len(rows: Sequence[torch.Tensor]) -> int:
    """The number of leading tokens every row has in common."""
    if not rows:
        return 0
    shortest = min(len(r) for r in rows)
    first = rows[0][:shortest]
    same = torch.ones(shortest, dtype=torch.bool)
    for row in rows[1:]:
        same &= row[:shortest] == first
    mismatch = (~same).nonzero()
    return int(mismatch[0]) if len(mismatch) else shortest


def _sliding_window(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def _new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=cast(Any, model).config)
    except TypeError:  # transformers releases whose DynamicCache takes no config
        return DynamicCache()


def _prefix_cache(model: torch.nn.Module, prefix: torch.Tensor):
    """The batch-1 cache of ``prefix`` for ``model``, computed once and kept (at most :data:`MAX_PREFIXES_PER_MODEL`
    per model and :data:`MAX_PREFIX_BYTES` of keys and values, least recent out; a larger one is not kept).

    A new prefix that extends one already cached, or a registered one (:func:`register_prefix`, computed then
    and kept too), runs only its extra tokens on a copy of that cache: a batch's shared prefix is usually the
    format's fixed start and a few words of the questions, and differs from batch to batch.
    """
    key = tuple(int(t) for t in prefix)
    with _lock:
        entries = _store.setdefault(model, OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        bases = [k for k in (*entries, *(_known.get(model) or ())) if len(k) < len(key) and key[: len(k)] == k]
    base = max(bases, key=len, default=())
    device = next(model.parameters()).device
    cache = copy.deepcopy(_prefix_cache(model, prefix[: len(base)])) if base else _new_cache(model)
    with torch.no_grad():
        model(input_ids=prefix[None, len(base) :].to(device), use_cache=True, **{cache_argument(model): cache},
              **_one_logit(model))
    size = cache_bytes(cache)
    if size > MAX_PREFIX_BYTES:
        return cache  # used for this call, never kept
    with _lock:
        entries = _store.setdefault(model, OrderedDict())
        entries[key] = cache
        while len(entries) > MAX_PREFIXES_PER_MODEL or sum(cache_bytes(c) for c in entries.values()) > MAX_PREFIX_BYTES:
            entries.popitem(last=False)
    return cache


def cache_bytes(cache: Any) -> int:
    """The bytes of a KV cache's keys and values (transformers' layered caches; 0 for a cache it cannot read)."""
    tensors = [t for layer in getattr(cache, "layers", ()) for t in (getattr(layer, "keys", None),
                                                                    getattr(layer, "values", None))]
    if not tensors:  # transformers releases before layered caches
        tensors = [*getattr(cache, "key_cache", ()), *getattr(cache, "value_cache", ())]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def clear_prefix_cache(model: torch.nn.Module | None = None, *, keep_registered: bool = False) -> None:
    """Forget cached prefixes (of one model, or of all); needed only after editing a model's weights in place or
    changing its arithmetic (:func:`autopatch.quantize.apply_mode` calls it). ``keep_registered``: forget only the
    computed keys and values, not the starts :func:`register_prefix` declared."""
    with _lock:
        stores = (_store, _recent) if keep_registered else (_store, _known, _recent)
        for store in stores:
            if model is None:
                store.clear()
            else:
                store.pop(model, None)


def register_prefix(model: torch.nn.Module, prefix: Sequence[int]) -> None:
    """Declare that many of ``model``'s prompts start with ``prefix`` (a prompt format's fixed start), so a
    single row that starts with it reuses its cache; it is computed the first time one does."""
    if len(prefix) >= MIN_PREFIX_TOKENS:
        with _lock:
            _known.setdefault(model, set()).add(tuple(int(t) for t in prefix))


def _reusable_len(model: torch.nn.Module, row: torch.Tensor, limit: int, *, registered_only: bool = False) -> int:
    """The longest cached or registered (``registered_only``: registered) prefix of at most ``limit`` tokens that
    ``row`` starts with (0: none). A single row's own start is only worth caching when it will be seen again: a
    prefix computed for one row alone is a second forward pass, not a saving."""
    with _lock:
        cached = () if registered_only else tuple(_store.get(model) or {})
        keys = [k for k in (*cached, *(_known.get(model) or ())) if len(k) <= limit]
    head = tuple(int(t) for t in row[: max((len(k) for k in keys), default=0)])
    return max((len(k) for k in keys if head[: len(k)] == k), default=0)


def _seen_again_len(model: torch.nn.Module, row: torch.Tensor, limit: int) -> int:
    """The longest start of at most ``limit`` tokens that ``row`` shares with another of the model's latest
    :data:`RECENT_ROWS` lone rows (0: none), and ``row`` remembered. A start that two different prompts share is a
    template that comes back (a client's fixed system prompt), where caching it pays. The same prompt sent again
    is not taken for one: that would cache a whole request, and make a bench that repeats its prompts time the
    cache instead of the model."""
    with _lock:
        recent = _recent.setdefault(model, deque(maxlen=RECENT_ROWS))
        earlier = list(recent)
        recent.append(row.clone())  # the caller's tensor may change after this
    others = [r for r in earlier if not (len(r) == len(row) and torch.equal(r, row))]
    return max((min(shared_prefix_len([other, row]), limit) for other in others), default=0)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate`` gives a left-padded batch: count the row's own tokens, padding at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors into a left-padded batch and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def prefix_layout(model: torch.nn.Module, rows: Sequence[torch.Tensor], pad_id: int, *,
                  protect: Sequence[int] = (), enabled: bool = True) -> PrefixLayout:
    """Lay ``rows`` out for one ``generate`` call, reusing the KV cache of the prefix they all share.

    ``protect``: non-negative row positions that a capture or patch will touch; the cached prefix stops before
    the earliest. The last token of every row always stays in the suffix (its logits start the answer). A batch
    of one row uses only a prefix already cached, registered (:func:`register_prefix`), or shared with one of the
    latest lone rows (:data:`RECENT_ROWS`): where the cache pays, since that start is seen again.
    A batch-invariant model (:func:`autopatch.invariance.batch_invariant`) reuses only a registered prefix that every
    row starts with, so that a row's split between prefix and suffix, and so its arithmetic, never depends on its batch.
    """
    rows = [r.cpu() for r in rows]
    protected = [p for p in protect if p >= 0]
    limit = min([min(len(r) for r in rows) - 1, *protected]) if rows else 0
    if not enabled or not rows or _bypassed.get():
        length = 0
    elif batch_invariant(model):
        # Where a split point that moved with the batch (or with what was cached before) would move a row's
        # arithmetic (autopatch.invariance), only a registered start, the same for every row, is reused.
        ends = {_reusable_len(model, r, min([len(r) - 1, *protected]), registered_only=True) for r in rows}
        length = ends.pop() if len(ends) == 1 else 0
    elif len(rows) > 1:  # several rows share their prefix's computation
        length = min(shared_prefix_len(rows), limit)
    else:  # one row only gains from a start seen before: cached, registered, or shared with a recent lone row
        length = _reusable_len(model, rows[0], limit)
        seen = _seen_again_len(model, rows[0], limit)
        if seen >= length + MIN_PREFIX_TOKENS:  # a few more tokens (a question's first words) cost a forward call
            length = seen
    window = _sliding_window(model)
    if window is not None and max(len(r) for r in rows) >= window:
        length = 0  # a sliding-window cache would drop the prefix's oldest keys
    if length < MIN_PREFIX_TOKENS:
        ids, mask = left_pad(rows, pad_id)
        return PrefixLayout(ids, mask, 0)
    prefix = rows[0][:length]
    try:
        cache = copy.deepcopy(_prefix_cache(model, prefix))
        cache.batch_repeat_interleave(len(rows))
    except (AttributeError, TypeError, ValueError, NotImplementedError):  # a model whose cache cannot be reused so
        ids, mask = left_pad(rows, pad_id)
        return PrefixLayout(ids, mask, 0)
    suffix_ids, suffix_mask = left_pad([r[length:] for r in rows], pad_id)
    batch = len(rows)
    ids = torch.cat([prefix[None].expand(batch, -1), suffix_ids], dim=1)
    mask = torch.cat([torch.ones(batch, length, dtype=torch.long), suffix_mask], dim=1)
    return PrefixLayout(ids, mask, length, cache)
