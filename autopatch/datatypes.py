"""The records the pipeline passes from step to step, in one place.

Example:
    >>> from autopatch.datatypes import PatchReport
    >>> report = patcher.answer("What is the capital of the country where the Colosseum is?")[0].report
    >>> isinstance(report, PatchReport), report.patched, report.reason

In the order a row meets them: :class:`RowPlan` (plan: the located question and
its token positions), :class:`GateInput` and :class:`GateDecision` (gate),
:class:`PatchJob` and :class:`Target` (strategy: the state to use and the
prompt to continue from), :class:`PatchReport`, :class:`GenerateResult` and
:class:`Answer` (report). The modules that make and consume them re-export
them, so ``from autopatch.patcher import PatchReport`` keeps working.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from autopatch.locate import Location
from autopatch.profile import PatchProfile, Position

POSITION_KINDS: tuple[Position, ...] = tuple(Position)


@dataclass(frozen=True)
class GateInput:
    """What a gate may look at for one row, all from the single vanilla prefill."""

    question: str | None
    location: Location | None
    states: dict[int, torch.Tensor]  # layer -> (3, hidden): rows follow POSITION_KINDS
    first_token_logits: torch.Tensor  # (vocab,)

    def state(self, layer: int, kind: Position | str) -> torch.Tensor:
        """The captured state at ``layer`` for position ``kind`` (a :class:`Position` or its name)."""
        return self.states[layer][POSITION_KINDS.index(kind)]


@dataclass(frozen=True)
class GateDecision:
    """Whether to patch one row, with the gate's score and a human-readable reason.

    ``profile``: how to patch this row, for gates that choose among strategies (``None``: the patcher's profile).
    """

    patch: bool
    score: float | None  # the deciding gate's own score (None: it gives none, or the screen kept the row from it)
    reason: str
    profile: PatchProfile | None = None
    screen_score: float | None = None  # P(two-hop question) from a two-hop screen, where one ran (classifiers.screen)
    screen_passed: bool | None = None  # whether that screen passed the row on to the gate (None: no screen)


@dataclass
class RowPlan:
    """One row's question, its location and the token positions of the located parts."""

    question: str | None
    location: Location | None
    positions: dict[Position, int] = field(default_factory=dict)
    why_not: str = ""
    proposal_tokens: int = 0  # tokens the model generated to propose this row's decomposition (autopatch.decomposer)
    awaiting_proposal: bool = False  # the model proposes its decomposition after the screen (autopatch.gating)
    window: tuple[int, ...] = ()  # while awaiting: the question's token indices, captured so a proposal can be read


@dataclass(frozen=True)
class PatchJob:
    """One row to correct: where its bridge state came from, and the state itself."""

    row: int
    location: Location
    prompt_ids: torch.Tensor  # (seq,) the caller's unpadded prompt
    source_index: int  # token index of the source position in prompt_ids
    vector: torch.Tensor  # (hidden,) block output at the profile's source layer
    placeholder: str | None = None  # words for the target prompt's slot instead of the profile's placeholder
    more: tuple[tuple[int, torch.Tensor], ...] = ()  # further (index in prompt_ids, state) pairs patched beside it


@dataclass
class Target:
    """Token ids to generate from, the patches for their prefill, and what to report."""

    row: int
    input_ids: torch.Tensor  # (seq,)
    edits: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (layer, position, vector)
    prompt_text: str = ""
    bridge: str | None = None
    bridge_tokens: int = 0  # tokens generated to decode the bridge (counted in the method's cost)


@dataclass
class PatchReport:
    """What autopatch did with one row, and why."""

    question: str | None = None
    location: dict | None = None
    positions: dict[Position, int] | None = None  # token indices in the caller's unpadded prompt
    located: bool = False
    patched: bool = False
    gate_score: float | None = None  # the deciding gate's score; a screen's is screen_score
    screen_score: float | None = None
    screen_passed: bool | None = None  # None: no two-hop screen ran on this row
    reason: str = ""
    strategy: str | None = None
    source_layer: int | None = None
    target_layer: int | None = None
    source_position: str | None = None
    control: str | None = None
    target_prompt: str | None = None
    bridge: str | None = None
    bridge_tokens: int = 0  # tokens generated to decode the bridge, on top of the answer's
    proposal_tokens: int = 0  # tokens the model generated proposing a decomposition (decomposer "model"/"both")
    vanilla_first_token: str | None = None
    answer: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """One question's answer from :meth:`AutoPatcher.answer`: the text and what autopatch did."""

    question: str
    text: str
    report: PatchReport

    def to_dict(self) -> dict:
        return {"question": self.question, "text": self.text, "report": self.report.to_dict()}


@dataclass(frozen=True)
class GenerateResult:
    """What one :meth:`AutoPatcher.generate_with_reports` call returns: ``generate``'s output and per-row details."""

    output: Any  # exactly what model.generate would return (tensor or dict output)
    reports: list[PatchReport]
    targets: dict[int, Target]  # row -> the patched prompt and its edits (for audits)
