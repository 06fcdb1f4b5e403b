"""Step 3 of a call, the gate: per row, decide from the vanilla prefill whether to patch.

Example:
    >>> from autopatch.gating import AlwaysPatch, NeverPatch
    >>> patcher = AutoPatcher(model, tok, gate=NeverPatch())   # behaves exactly like model.generate
    >>> decider = DecideAfterPrefill(lambda scores: decide_rows(gate, pre.plans, pre.states, layers, scores))

A gate sees, for each row, the located question, the hidden states captured
during the vanilla prefill (at ``feature_layers`` and the three located
positions) and the vanilla first-token logits; it returns a
:class:`GateDecision`. Learned gates live in the ``classifiers`` package and
implement the same :class:`Gate` protocol.

The gate runs inside the one ``model.generate`` call, after its prefill and before its first token is chosen
(:class:`DecideAfterPrefill`, a logits processor), and the rows it patches end there
(:class:`StopPatchedRows`), so a batch whose gate patches nothing *is* ``model.generate``'s result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, cast, runtime_checkable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from autopatch.datatypes import POSITION_KINDS as POSITION_KINDS  # re-exported: the types live in autopatch.datatypes
from autopatch.datatypes import GateDecision as GateDecision
from autopatch.datatypes import GateInput as GateInput
from autopatch.datatypes import RowPlan
from autopatch.merging import GatedStreamer, with_continuations


@runtime_checkable
class Gate(Protocol):
    """Anything with ``feature_layers`` and ``decide(inputs) -> decisions`` can gate autopatch."""

    feature_layers: tuple[int, ...]

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]: ...


@runtime_checkable
class Prescreening(Protocol):
    """A gate in two stages: a screen that reads every row, then a gate for the rows it passes
    (:class:`classifiers.screen.ScreenedGate`). When the screen does not read where the question was located,
    a decomposition the model proposes is asked for only after it, and only for the rows it passed."""

    feature_layers: tuple[int, ...]

    @property
    def reads_last_token_only(self) -> bool: ...

    def prescreen(self, inputs: Sequence[GateInput]) -> list[GateDecision]: ...

    def decide_passed(self, inputs: Sequence[GateInput], verdicts: Sequence[GateDecision]) -> list[GateDecision]: ...

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]: ...


def screens_before_proposals(gate: Gate) -> bool:
    """Whether ``gate`` can screen rows before the model proposes their decompositions (see :class:`Prescreening`)."""
    return isinstance(gate, Prescreening) and gate.reads_last_token_only


class AlwaysPatch:
    """Patch every row that could be located."""

    feature_layers: tuple[int, ...] = ()

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]:
        return [GateDecision(True, None, "gate: always patch") for _ in inputs]


class NeverPatch:
    """Never patch: the wrapper then behaves exactly like ``model.generate``."""

    feature_layers: tuple[int, ...] = ()

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]:
        return [GateDecision(False, None, "gate: never patch") for _ in inputs]


def decide_rows(gate: Gate, plans: Sequence[RowPlan], states: dict[int, torch.Tensor], layers: Sequence[int],
                scores: torch.Tensor, propose: Callable[[list[int]], None] | None = None) -> list[GateDecision]:
    """The gate's decision for each row: located rows go to ``gate.decide`` (in one call), the others are left
    alone with their plan's reason. ``states``: layer -> (batch, positions, hidden), the first three in
    ``POSITION_KINDS`` order; ``scores``: the first step's logits.

    ``propose`` (with a :class:`Prescreening` gate): the screen first reads every located row and every row
    awaiting a proposal (``plan.awaiting_proposal``); then ``propose(rows)`` re-plans, in ``plans`` and
    ``states``, only the awaiting rows it passed; then the gate decides the passed rows that are located.
    """
    def inputs(rows: Sequence[int]) -> list[GateInput]:
        return [GateInput(plans[i].question, plans[i].location, {l: states[l][i] for l in layers}, scores[i])
                for i in rows]

    decisions = [GateDecision(False, None, p.why_not) for p in plans]
    located = [i for i, p in enumerate(plans) if p.location is not None and p.positions]
    if propose is None or not isinstance(gate, Prescreening):
        for i, d in zip(located, gate.decide(inputs(located)) if located else []):
            decisions[i] = d
        return decisions
    screened = [i for i, p in enumerate(plans) if i in located or p.awaiting_proposal]
    verdicts = dict(zip(screened, gate.prescreen(inputs(screened))))
    decisions = [verdicts.get(i, d) for i, d in enumerate(decisions)]
    passed = [i for i in screened if verdicts[i].screen_passed]
    awaiting = [i for i in passed if plans[i].awaiting_proposal]
    if awaiting:
        propose(awaiting)
    ready = [i for i in passed if plans[i].location is not None and plans[i].positions]
    decisions = [replace(d, reason=f"{d.reason}; {plans[i].why_not}") if i in passed and i not in ready else d
                 for i, d in enumerate(decisions)]
    for i, d in zip(ready, gate.decide_passed(inputs(ready), [verdicts[i] for i in ready]) if ready else []):
        decisions[i] = d
    return decisions


class DecideAfterPrefill(LogitsProcessor):
    """Runs the gate once, on the first step's scores, before any token is chosen."""

    def __init__(self, decide: Callable[[torch.Tensor], list[GateDecision]]) -> None:
        self.decide = decide
        self.decisions: list[GateDecision] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.decisions is None:
            self.decisions = self.decide(scores)
        return scores


class StopPatchedRows(StoppingCriteria):
    """Ends the rows the gate chose to patch; they are answered from the patched continuation."""

    def __init__(self, decider: DecideAfterPrefill):
        self.decider = decider

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        decisions = self.decider.decisions or []
        flags = [d.patch for d in decisions] or [False] * input_ids.shape[0]
        return cast(torch.BoolTensor, torch.tensor(flags, dtype=torch.bool, device=input_ids.device))


def gated_generate(model, pre: Any, gate: Gate, layers: Sequence[int], input_ids: torch.Tensor, mask: torch.Tensor,
                   *, pad_id: int, unpatched: Sequence[Sequence[int]] | None = None,
                   logits_processor=None, stopping_criteria=None, streamer=None,
                   propose: Callable[[list[int]], None] | None = None, **generate_kwargs) -> tuple[Any, list[GateDecision]]:
    """The batch's one unpatched ``model.generate``, run inside ``pre`` (:func:`autopatch.prefill.capture_prefill`),
    with the gate deciding after its prefill; returns ``(output, decisions)``. Rows the gate patches end there.
    ``mask``: the batch's attention mask (inferred by the caller when it passed none); ``generate_kwargs`` go to
    ``model.generate`` as the caller gave them.

    ``unpatched``: each row's continuation, already known; then only the prefill runs, for the gate, and the output
    is those continuations, padded with ``pad_id``. ``propose``: see :func:`decide_rows`. A ``streamer`` sees the
    first row's tokens only while that row is left alone.
    """
    decider = DecideAfterPrefill(lambda scores: decide_rows(gate, pre.plans, pre.states, layers, scores, propose))
    if unpatched is None:
        processors = LogitsProcessorList([decider, *(logits_processor or [])])
        criteria = StoppingCriteriaList([*(stopping_criteria or []), StopPatchedRows(decider)])
        first_row_patched = lambda: bool(decider.decisions and decider.decisions[0].patch)  # noqa: E731
        gated_streamer = GatedStreamer(streamer, first_row_patched) if streamer is not None else None
        main = pre.generate(model, input_ids, logits_processor=processors, stopping_criteria=criteria,
                            streamer=gated_streamer, **generate_kwargs)
    else:
        logits = pre.forward(model, input_ids, mask, logits_to_keep=1).logits[:, -1].float()
        decider.decisions = decider.decide(logits)
        main = with_continuations(input_ids, unpatched, pad_id)
    decisions = decider.decisions or [GateDecision(False, None, "generation produced no step") for _ in pre.plans]
    return main, decisions
