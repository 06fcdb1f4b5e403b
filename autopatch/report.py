"""Step 5 of a call: one :class:`PatchReport` per row, saying what autopatch did and why.

Example:
    >>> reports = row_reports(tok, plans, decisions, main_sequences, width, profile, control=None)
    >>> attach_targets(reports, targets)
    >>> out = finish(tok, out, reports, out_sequences, width)

Three parts, in the order a call runs them: :func:`row_reports` (a report per row from its plan and the gate's
decision, right after the unpatched generation, so the rows the gate left alone can be reported before the patched
rows are generated), :func:`attach_targets` (the patched rows' prompts and bridges), :func:`finish` (answers
decoded; dict outputs carry the reports as ``out.autopatch``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from autopatch.datatypes import GateDecision, PatchReport, RowPlan, Target
from autopatch.profile import PatchProfile

__all__ = ["attach_targets", "finish", "row_reports"]


def row_reports(tokenizer, plans: Sequence[RowPlan], decisions: Sequence[GateDecision], sequences: torch.Tensor,
                width: int, profile: PatchProfile, control: str | None) -> list[PatchReport]:
    """A report per row from its plan and the gate's decision (``profile``: the patcher's own, for rows the gate
    gave none); ``vanilla_first_token`` is the first token the unpatched generation chose."""
    reports = []
    for i, (plan, decision) in enumerate(zip(plans, decisions)):
        p = decision.profile or profile
        first = tokenizer.decode(sequences[i, width : width + 1]) if sequences.shape[1] > width else None
        reports.append(PatchReport(
            question=plan.question, location=plan.location.to_dict() if plan.location else None,
            positions=plan.positions or None, located=bool(plan.location and plan.positions),
            patched=decision.patch, gate_score=decision.score, screen_score=decision.screen_score,
            screen_passed=decision.screen_passed, reason=decision.reason,
            strategy=p.strategy, source_layer=p.source_layer, target_layer=p.target_layer,
            source_position=p.source_position, control=control, vanilla_first_token=first,
            proposal_tokens=plan.proposal_tokens))
    return reports


def attach_targets(reports: list[PatchReport], targets: Iterable[Target]) -> None:
    """Record each patched row's prompt and decoded bridge in its report."""
    for target in targets:
        report = reports[target.row]
        report.target_prompt, report.bridge, report.bridge_tokens = target.prompt_text, target.bridge, target.bridge_tokens


def finish(tokenizer, out, reports: list[PatchReport], sequences: torch.Tensor, width: int):
    """Decode each row's answer into its report; dict outputs also carry the reports as ``out.autopatch``."""
    for i, report in enumerate(reports):
        report.answer = tokenizer.decode(sequences[i, width:], skip_special_tokens=True)
    if not isinstance(out, torch.Tensor):
        out.autopatch = reports
    return out
