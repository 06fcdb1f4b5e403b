"""Capture and patch the residual stream (decoder-block outputs) with context managers.

Example:
    >>> from autopatch.engine import capture, patch, PatchEdit
    >>> enc = tok(["Paris is in", "The Colosseum is in"], return_tensors="pt", padding=True)
    >>> with capture(model, layers=[6], positions=[-1], attention_mask=enc.attention_mask) as cap:
    ...     model(**enc)
    >>> h = cap.states[6][:, 0]                       # (batch, hidden): block 6 output, last token
    >>> edits = [PatchEdit(layer=3, row=0, position=-1, vector=h[1])]
    >>> with patch(model, edits, attention_mask=enc.attention_mask):
    ...     out = model.generate(**enc, max_new_tokens=5)   # only the prefill is patched

Conventions, shared by every function here:

* "Layer ℓ" is the output of decoder block ℓ (0-indexed), i.e. HF's
  ``hidden_states[ℓ + 1]`` (Patchscopes uses the same convention).
* Positions count tokens of the *unpadded* prompt: ``0`` is its first token,
  ``-1`` its last. With an ``attention_mask`` they are translated to the padded
  batch, for left or right padding alike.
* By default a context acts on the first forward call it sees (the prefill of a
  ``generate`` call); decode steps are left alone, so a patch reaches later
  tokens only through the KV cache, as in Patchscopes and back-patching.
* Blocks that return a bare tensor (transformers >= 5) and blocks that return
  a tuple are both handled; the output keeps its structure.
* Patch vectors are cast to each block's device and dtype (``device_map="auto"``).
* Hooks are removed in ``finally``: after exceptions and ``KeyboardInterrupt`` too.
* Hooks act only on the thread that opened the context, so several threads
  may capture, patch and generate on one model at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from autopatch.architectures import decoder_layers
from autopatch.errors import PatchError

VectorMap = Callable[[torch.Tensor], torch.Tensor]
Positions = Sequence[int] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class PatchEdit:
    """Overwrite block ``layer``'s output at (``row``, ``position``) with ``fn(vector)``.

    ``fn`` defaults to the identity; any callable works, e.g. an affine map for
    cross-model patching. ``position`` counts tokens of the unpadded prompt.
    """

    layer: int
    row: int
    position: int
    vector: torch.Tensor
    fn: VectorMap | None = None


@dataclass
class CaptureResult:
    """What :func:`capture` recorded: ``states[layer]`` is ``(batch, n_positions, hidden)``.

    Without ``positions`` it holds every position of the (padded) input.
    """

    states: dict[int, torch.Tensor] = field(default_factory=dict)


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden-state tensor of a block output, whether bare or the first tuple item."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise PatchError(
        f"Unexpected decoder-block output of type {type(output).__name__}; expected a tensor "
        "or a tuple whose first item is the hidden states."
    )


def with_block_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """Return ``output`` with its hidden states replaced, keeping the same structure."""
    if isinstance(output, torch.Tensor):
        return hidden
    return type(output)((hidden, *output[1:])) if isinstance(output, tuple) else [hidden, *output[1:]]


def prompt_bounds(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> list[tuple[int, int]]:
    """Per row, ``(offset, length)`` of the real tokens in a padded batch.

    Works for left and right padding; assumes the real tokens are contiguous.
    """
    if attention_mask is None:
        return [(0, seq_len)] * batch
    mask = attention_mask.to("cpu").bool()
    if mask.shape[0] != batch:
        raise PatchError(f"attention_mask has {mask.shape[0]} rows but the batch has {batch}.")
    bounds = []
    for row in mask:
        nonzero = row.nonzero()
        if len(nonzero) == 0:
            bounds.append((0, 0))
        else:
            bounds.append((int(nonzero[0]), int(nonzero[-1]) - int(nonzero[0]) + 1))
    return bounds


def absolute_position(position: int, bounds: tuple[int, int]) -> int:
    """Translate a position of the unpadded prompt to an index into the padded row."""
    offset, length = bounds
    relative = position if position >= 0 else length + position
    if not 0 <= relative < length:
        raise PatchError(f"Position {position} is outside a prompt of {length} tokens.")
    return offset + relative


def _check_layers(model: nn.Module, layers: Sequence[int]) -> nn.ModuleList:
    blocks = decoder_layers(model)
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise PatchError(f"Layer {layer} does not exist: the model has {len(blocks)} decoder blocks (0..{len(blocks) - 1}).")
    return blocks


def _rows_positions(positions: Positions, batch: int) -> list[list[int]]:
    if positions and isinstance(positions[0], Sequence):
        per_row = [list(p) for p in positions]  # type: ignore[arg-type]
        if len(per_row) != batch:
            raise PatchError(f"Got positions for {len(per_row)} rows but the batch has {batch}.")
        if len({len(p) for p in per_row}) > 1:
            raise PatchError("Every row must ask for the same number of positions.")
        return per_row
    return [list(positions)] * batch  # type: ignore[arg-type]


def _this_thread_only(fn: Callable, owner: int) -> Callable:
    """A hook that acts only on forward calls made by the thread that opened the context.

    Hooks live on the shared modules, so without this a capture or patch opened
    in one thread would fire on another thread's concurrent forward pass.
    """

    def hook(module: nn.Module, args: tuple, output):
        if threading.get_ident() != owner:
            return None
        return fn(module, args, output)

    return hook


@contextmanager
def _hooks(modules_and_fns: Sequence[tuple[nn.Module, Callable]], *, prepend: bool = False) -> Iterator[None]:
    handles = []
    owner = threading.get_ident()
    try:
        for module, fn in modules_and_fns:
            handles.append(module.register_forward_hook(_this_thread_only(fn, owner), prepend=prepend))
        yield
    finally:
        for handle in handles:
            handle.remove()


_every_call_lock = threading.Lock()
_every_call: dict[tuple[int, int], int] = {}  # (id(model), thread) -> its open contexts with prefill_only=False


def acts_on_every_call(model: nn.Module) -> bool:
    """Whether this thread has a capture or patch open on ``model`` with ``prefill_only=False``: its hooks count
    the batch's rows at every forward call, so the batch must keep every row to the end
    (:mod:`autopatch.shrinking` asks)."""
    with _every_call_lock:
        return _every_call.get((id(model), threading.get_ident()), 0) > 0


@contextmanager
def _every_call_open(model: nn.Module, prefill_only: bool) -> Iterator[None]:
    if prefill_only:
        yield
        return
    key = (id(model), threading.get_ident())
    with _every_call_lock:
        _every_call[key] = _every_call.get(key, 0) + 1
    try:
        yield
    finally:
        with _every_call_lock:
            _every_call[key] -= 1
            if not _every_call[key]:
                del _every_call[key]


@contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[int],
    positions: Positions | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    prefill_only: bool = True,
) -> Iterator[CaptureResult]:
    """Record block outputs at ``layers`` (and ``positions``) during the forward pass(es) inside.

    ``positions`` is one list for every row or one list per row. With
    ``prefill_only=False`` each later call overwrites the record.
    """
    blocks = _check_layers(model, layers)
    result = CaptureResult()

    def make_hook(layer: int) -> Callable:
        calls = 0

        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            nonlocal calls
            calls += 1
            if prefill_only and calls > 1:
                return None
            hidden = block_hidden(output)
            if positions is None:
                result.states[layer] = hidden.detach().clone()
                return None
            batch, seq_len = hidden.shape[:2]
            bounds = prompt_bounds(attention_mask, batch, seq_len)
            rows = _rows_positions(positions, batch)
            index = torch.tensor([[absolute_position(p, bounds[r]) for p in rows[r]] for r in range(batch)])
            if index.numel() and int(index.max()) >= seq_len:
                raise PatchError(f"Capture position {int(index.max())} is beyond the {seq_len} tokens of this forward call.")
            gathered = hidden.detach()[torch.arange(batch)[:, None], index.to(hidden.device)]
            result.states[layer] = gathered.clone()
            return None

        return hook

    with _every_call_open(model, prefill_only), _hooks([(blocks[layer], make_hook(layer)) for layer in sorted(set(layers))]):
        yield result


@contextmanager
def patch(
    model: nn.Module,
    edits: Sequence[PatchEdit],
    *,
    attention_mask: torch.Tensor | None = None,
    prefill_only: bool = True,
) -> Iterator[None]:
    """Overwrite block outputs as ``edits`` say during the forward pass(es) inside.

    With ``prefill_only=True`` (default) only the first forward call is patched.
    """
    blocks = _check_layers(model, [e.layer for e in edits])
    by_layer: dict[int, list[PatchEdit]] = {}
    for edit in edits:
        by_layer.setdefault(edit.layer, []).append(edit)

    def make_hook(layer_edits: list[PatchEdit]) -> Callable:
        calls = 0

        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple):
            nonlocal calls
            calls += 1
            if prefill_only and calls > 1:
                return None
            hidden = block_hidden(output)
            batch, seq_len = hidden.shape[:2]
            bounds = prompt_bounds(attention_mask, batch, seq_len)
            hidden = hidden.clone()
            for edit in layer_edits:
                if not 0 <= edit.row < batch:
                    raise PatchError(f"Patch row {edit.row} is outside a batch of {batch}.")
                pos = absolute_position(edit.position, bounds[edit.row])
                if pos >= seq_len:
                    raise PatchError(f"Patch position {pos} is beyond the {seq_len} tokens of this forward call.")
                vector = edit.fn(edit.vector) if edit.fn is not None else edit.vector
                if vector.shape[-1] != hidden.shape[-1]:
                    raise PatchError(
                        f"Patch vector has size {vector.shape[-1]} but layer {edit.layer} has hidden size "
                        f"{hidden.shape[-1]}; pass fn= to map between models."
                    )
                hidden[edit.row, pos] = vector.to(hidden.device, hidden.dtype)
            return with_block_hidden(output, hidden)

        return hook

    # prepend: other hooks on the block (captures, HF's output_hidden_states recorder) see the patched value
    with _every_call_open(model, prefill_only), \
            _hooks([(blocks[layer], make_hook(layer_edits)) for layer, layer_edits in by_layer.items()], prepend=True):
        yield
