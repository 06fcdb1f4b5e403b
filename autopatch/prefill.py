"""Step 2 of a call: one shared prefill, the batch's rows, their plans, and the states captured at the plans'
positions.

Example:
    >>> rows, plans, positions = Planner(tok, fmt).batch(enc.input_ids, enc.attention_mask)
    >>> with capture_prefill(model, tok.pad_token_id, rows, plans, positions, [6], enc.attention_mask,
    ...                      reuse_prefix=True) as pre:
    ...     out = pre.generate(model, enc.input_ids, max_new_tokens=8)   # through the cached prefix
    >>> job = pre.job(0, "span_end", 6)                                  # the patch job of row 0

:func:`capture_prefill` is the one prefill path of ``generate``, the sweep and the gate's features
(:meth:`autopatch.patcher.AutoPatcher.prefill` plans and opens it in one call).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from autopatch.datatypes import PatchJob as PatchJob  # re-exported: the types live in autopatch.datatypes
from autopatch.datatypes import RowPlan as RowPlan
from autopatch.engine import CaptureResult, capture
from autopatch.errors import PatchError
from autopatch.gating import POSITION_KINDS
from autopatch.merging import caller_views
from autopatch.prefix_cache import PrefixLayout, position_ids, prefix_layout
from autopatch.profile import Position
from autopatch.shrinking import shrinking_generate


@dataclass(frozen=True)
class Prefill:
    """One shared prefill: the unpadded rows, their plans, and the block outputs captured at the located positions.

    ``states`` is filled while the model runs inside :func:`capture_prefill`.
    """

    rows: list[torch.Tensor]
    plans: list[RowPlan]
    positions: list[list[int]]  # per row, capture positions in POSITION_KINDS order (-1 where unused)
    capture: CaptureResult
    layout: PrefixLayout | None = None  # with reuse_prefix=True: run the forward on these ids (see ``generate``)

    def forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        """One forward pass over the prefill's batch (through the cached prefix when there is one), with the
        position ids ``generate`` would use."""
        if self.layout is not None:
            return self.layout.forward(model, **kwargs)
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), **kwargs)

    def generate(self, model, input_ids: torch.Tensor, **kwargs):
        """``model.generate`` for the prefill's batch, through the cached prefix when there is one.

        The output has the caller's ``input_ids`` in front of the new tokens, as a plain call would, and the
        logits processors and stopping criteria see that same sequence at every step (through caller views).
        """
        if self.layout is None:
            return shrinking_generate(model, input_ids=input_ids, **kwargs)
        device = input_ids.device
        kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        for name in ("logits_processor", "stopping_criteria"):
            if kwargs.get(name):
                kwargs[name] = caller_views(kwargs[name], input_ids, self.layout.width)
        out = shrinking_generate(model, input_ids=self.layout.input_ids.to(device),
                                 attention_mask=self.layout.attention_mask.to(device),
                                 **self.layout.generate_kwargs(model), **kwargs)
        if isinstance(out, torch.Tensor):
            return self.layout.caller_sequences(out, input_ids)
        out.sequences = self.layout.caller_sequences(out.sequences, input_ids)
        return out

    @property
    def states(self) -> dict[int, torch.Tensor]:
        return self.capture.states

    def propose(self, planner: Any, rows: list[int]) -> None:
        """Re-plan ``rows`` (``awaiting_proposal``) from the model's own decompositions, asked now, and read
        their located positions' states from the question tokens captured for them (``RowPlan.window``)."""
        for row, plan in planner.proposed(self.rows, self.plans, rows).items():
            window = self.plans[row].window
            if plan.positions and not all(plan.positions[k] in window for k in POSITION_KINDS if k is not Position.LAST):
                plan = RowPlan(plan.question, None, why_not="the proposed decomposition located tokens outside the "
                               "question", proposal_tokens=plan.proposal_tokens)
            for k, kind in enumerate(POSITION_KINDS):
                if plan.positions and kind is not Position.LAST:
                    column = len(POSITION_KINDS) + window.index(plan.positions[kind])
                    for states in self.states.values():
                        states[row, k] = states[row, column]
                    self.positions[row][k] = plan.positions[kind]
            self.plans[row] = plan

    def job(self, row: int, source_position: Position, source_layer: int) -> PatchJob:
        """The patch job of a located row: its prompt, source index and captured vector."""
        plan = self.plans[row]
        if plan.location is None:
            raise PatchError(f"Row {row} was not located ({plan.why_not}); it has no patch job.")
        return PatchJob(row, plan.location, self.rows[row], plan.positions[source_position],
                        self.states[source_layer][row, POSITION_KINDS.index(source_position)])


@contextmanager
def capture_prefill(model, pad_token_id: int, rows: list[torch.Tensor], plans: list[RowPlan],
                    positions: list[list[int]], layers: Sequence[int], attention_mask: torch.Tensor, *,
                    reuse_prefix: bool = False) -> Iterator[Prefill]:
    """Capture ``layers`` at ``positions`` during the next forward pass run inside (see :meth:`Prefill.generate`).

    With ``reuse_prefix=True`` run that forward as ``pre.generate(model, ids, ...)`` or ``pre.forward(...)``: the
    rows' shared prefix then comes from :mod:`autopatch.prefix_cache`'s cache, and the capture positions are
    shifted into its layout (the located positions themselves are never served from the cache).
    """
    if not reuse_prefix:
        with capture(model, layers, positions, attention_mask=attention_mask) as cap:
            yield Prefill(rows, plans, positions, cap)
        return
    lay = prefix_layout(model, rows, pad_token_id, protect=[p for row in positions for p in row if p >= 0])
    shifted = [[lay.engine_position(p) if p >= 0 else p for p in row] for row in positions]
    with capture(model, layers, shifted, attention_mask=lay.engine_mask) as cap:
        yield Prefill(rows, plans, positions, cap, lay)
