"""The gate interface: per row, decide from the vanilla prefill whether to patch.

Example:
    >>> from autopatch.gating import AlwaysPatch, NeverPatch
    >>> patcher = AutoPatcher(model, tok, gate=NeverPatch())   # behaves exactly like model.generate

A gate sees, for each row, the located question, the hidden states captured
during the vanilla prefill (at ``feature_layers`` and the three located
positions) and the vanilla first-token logits; it returns a
:class:`GateDecision`. Learned gates live in the ``classifiers`` package and
implement the same :class:`Gate` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from autopatch.locate import Location
from autopatch.profile import PatchProfile

POSITION_KINDS: tuple[str, ...] = ("span_end", "subject_end", "last")


@dataclass(frozen=True)
class GateInput:
    """What a gate may look at for one row, all from the single vanilla prefill."""

    question: str | None
    location: Location | None
    states: dict[int, torch.Tensor]  # layer -> (3, hidden): rows follow POSITION_KINDS
    first_token_logits: torch.Tensor  # (vocab,)

    def state(self, layer: int, kind: str) -> torch.Tensor:
        """The captured state at ``layer`` for position ``kind`` ("span_end", "subject_end" or "last")."""
        return self.states[layer][POSITION_KINDS.index(kind)]


@dataclass(frozen=True)
class GateDecision:
    """Whether to patch one row, with the gate's score and a human-readable reason.

    ``profile``: how to patch this row, for gates that choose among strategies (``None``: the patcher's profile).
    """

    patch: bool
    score: float | None
    reason: str
    profile: PatchProfile | None = None


@runtime_checkable
class Gate(Protocol):
    """Anything with ``feature_layers`` and ``decide(inputs) -> decisions`` can gate autopatch."""

    feature_layers: tuple[int, ...]

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]: ...


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
