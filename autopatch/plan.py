"""Step 1 of a call: each row's question, where its parts are, and their token positions.

Example:
    >>> from autopatch.plan import Planner
    >>> planner = Planner(tok, patcher.profile.prompt_format)
    >>> plan = planner.row(enc.input_ids[0], "What is the capital of the country where the Colosseum is?")
    >>> plan.location.first_hop, plan.positions["span_end"]
    >>> rows, plans, positions = planner.batch(enc.input_ids, enc.attention_mask)

The question is read from the prompt when not given (the chat template's last user turn, else the format's
last ``Q:`` line), located (:func:`autopatch.locate.locate`, or from a decomposition), and its span, subject and
last token mapped to token indices. A row that cannot be planned keeps ``why_not``: it is never patched, and
its report says why. With ``decomposer="model"`` or ``"both"`` the model proposes the decomposition
(:mod:`autopatch.decomposer`); :class:`autopatch.patcher.AutoPatcher`, the sweep, the gate's features,
:func:`autopatch.explain.explain` and the proxy all plan through this one module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from autopatch.datatypes import POSITION_KINDS, RowPlan
from autopatch.errors import PatchError
from autopatch.locate import UnlocatableQuestion, locate
from autopatch.profile import DECOMPOSERS, Decomposer, Position
from autopatch.prompts import PromptFormat, chat_question
from autopatch.tokens import last_token_of_char_span, token_char_ends

__all__ = ["DECOMPOSERS", "Decomposer", "Planner", "locate_question"]


def locate_question(question: str, decomposition: Any = None) -> RowPlan:
    """The text half of a plan, no tokenizer needed: ``question`` located (or why not), no positions yet.
    What the proxy (``serve --upstream``) acts on, and where :meth:`Planner.row` starts."""
    try:
        return RowPlan(question, locate(question, decomposition))
    except UnlocatableQuestion as err:
        return RowPlan(question, None, why_not=f"unlocatable: {err.why}")


@dataclass(frozen=True)
class Planner:
    """Plans rows for one tokenizer and prompt format; ``model`` is needed only to propose decompositions."""

    tokenizer: Any
    prompt_format: PromptFormat
    decomposer: Decomposer = "grammar"
    model: Any = None

    def __post_init__(self) -> None:
        if self.decomposer not in DECOMPOSERS:
            raise PatchError(f"Unknown decomposer {self.decomposer!r}; choose one of {', '.join(DECOMPOSERS)}.")
        if self.decomposer != "grammar" and self.model is None:
            raise PatchError(f"decomposer={self.decomposer!r} needs the model, to propose decompositions.")

    def row(self, ids: torch.Tensor, question: str | None, decomposition: Any = None) -> RowPlan:
        """Locate one unpadded prompt's question and map the span, subject and last token to token indices."""
        tok = self.tokenizer
        text = tok.decode(ids, skip_special_tokens=True)
        if question is None and getattr(tok, "chat_template", None):
            question = chat_question(tok, tok.decode(ids, skip_special_tokens=False))
        if question is None:
            question = self.prompt_format.extract_question(text) or PromptFormat().extract_question(text)
        if not question:
            return RowPlan(None, None, why_not="no question found in the prompt (no 'Q:' line or chat user turn); "
                                               "pass questions=")
        located = locate_question(question, decomposition)
        location = located.location
        if location is None:
            return located
        at = text.rfind(question)
        if at < 0:
            return RowPlan(question, location, why_not="the question text does not occur in the decoded prompt")
        ends = token_char_ends(tok, ids)
        try:
            positions = {
                Position.SPAN_END: last_token_of_char_span(ends, at + location.span_start, at + location.span_end),
                Position.SUBJECT_END: last_token_of_char_span(ends, at + location.subject_start,
                                                              at + location.subject_end),
                Position.LAST: len(ids) - 1,
            }
        except (IndexError, ValueError) as err:  # a tokenizer whose decode() does not round-trip the text
            return RowPlan(question, location, why_not=f"cannot map the located span to tokens: {err}")
        return RowPlan(question, location, positions)

    def window(self, ids: torch.Tensor, question: str) -> tuple[int, ...]:
        """The token indices of ``ids`` that hold ``question`` (empty when its text is not found)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        at = text.rfind(question)
        if at < 0:
            return ()
        ends = token_char_ends(self.tokenizer, ids)
        return tuple(i for i, end in enumerate(ends) if end > at and (i == 0 or ends[i - 1] < at + len(question)))

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              questions: Sequence[str | None] | None = None, decompositions: Sequence[Any] | None = None,
              *, defer_proposals: bool = False) -> tuple[list[torch.Tensor], list[RowPlan], list[list[int]]]:
        """Unpadded rows, their plans, and per row the capture positions in ``POSITION_KINDS`` order
        (-1 where a row has none).

        ``defer_proposals``: rows the model would propose a decomposition for are planned by the grammar and
        marked ``awaiting_proposal``, and their question's tokens are added to the capture positions (-1 pads
        them to one width), so the proposal can be asked after the screen (:meth:`proposed`)."""
        size = input_ids.shape[0]
        rows = [input_ids[i][attention_mask[i].bool()].cpu() for i in range(size)]
        questions = list(questions) if questions is not None else [None] * size
        decompositions = list(decompositions) if decompositions is not None else [None] * size
        if len(questions) != size or len(decompositions) != size:
            raise PatchError(f"questions/decompositions need one entry per row ({size}).")
        plans = [self.row(rows[i], questions[i], decompositions[i]) for i in range(size)]
        need = self._proposal_rows(plans, decompositions)
        if defer_proposals:
            for i in need:
                plans[i] = replace(plans[i], awaiting_proposal=True,
                                   window=self.window(rows[i], cast(str, plans[i].question)))
        else:
            for i, plan in self.proposed(rows, plans, need).items():
                plans[i] = plan
        width = max((len(p.window) for p in plans), default=0)
        positions = [[p.positions.get(k, -1) for k in POSITION_KINDS] + [*p.window, *[-1] * (width - len(p.window))]
                     for p in plans]
        return rows, plans, positions

    def _proposal_rows(self, plans: Sequence[RowPlan], given: Sequence[Any]) -> list[int]:
        """The rows the model proposes a decomposition for: every row with a question (``"model"``), or only
        where the grammar located nothing (``"both"``); never over a caller's."""
        if self.decomposer == "grammar":
            return []
        return [i for i, p in enumerate(plans) if p.question and given[i] is None
                and (self.decomposer == "model" or p.location is None)]

    def proposed(self, rows: Sequence[torch.Tensor], plans: Sequence[RowPlan], need: Sequence[int]) -> dict[int, RowPlan]:
        """The plans of rows ``need`` re-made from the model's own decompositions (one batched generate); a row
        whose proposal is unusable keeps the grammar's plan."""
        from autopatch.decomposer import propose_decompositions_counted

        if not need:
            return {}
        proposals = propose_decompositions_counted(self.model, self.tokenizer, self.prompt_format,
                                                   [cast(str, plans[i].question) for i in need])
        return {i: replace(plans[i] if steps is None else self.row(rows[i], plans[i].question, steps),
                           proposal_tokens=n, awaiting_proposal=False, window=())
                for i, (steps, n) in zip(need, proposals)}
