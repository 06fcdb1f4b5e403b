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
from typing import Protocol, runtime_checkable

from autopatch.datatypes import POSITION_KINDS as POSITION_KINDS  # re-exported: the types live in autopatch.datatypes
from autopatch.datatypes import GateDecision as GateDecision
from autopatch.datatypes import GateInput as GateInput


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
