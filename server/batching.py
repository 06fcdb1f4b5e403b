"""Micro-batching: compatible non-streamed jobs run through ONE batched ``AutoPatcher.generate`` call.

Example:
    >>> from server.batching import batchable, compatible, run_batch
    >>> jobs = [a, b, c]                                   # greedy, same patching, profile and gate
    >>> all(compatible(jobs[0], j) for j in jobs)
    True
    >>> events = run_batch(model, tok, jobs, control=None)  # one ("done", result) / ("error", err) / None per job

The prompts are left-padded into one batch. Every row keeps its own
``max_tokens``, stop strings, cancellation and deadline through one stopping
criterion (:class:`RowHalt`) that answers per row, so stopping or cancelling one
request never touches the others: the batch runs to the largest budget and
each row ends where it would have ended alone. A patched row is answered from a
second ``generate`` call over the patched rows only; ``autopatch.merging``'s
caller views show the criterion the caller's prompt followed by that row's new
tokens, and :meth:`RowHalt.rows_of` finds the row again by its prompt.

Only greedy requests are batched (sampled ones need their own seed and random
stream), and only with the same ``patching`` flag, the same profile and the
very same gate object (a per-request threshold copies the gate, so such a
request runs alone). Results are read from the output tensor exactly as for a
batch of one, so a request's answer does not depend on its batch mates, up to
floating-point differences between batch shapes (none were seen with the tiny
test models; ``bench/bench_server.py`` checks it on a real model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from autopatch.patcher import AutoPatcher
from autopatch.prefix_cache import left_pad
from autopatch.stopping import cut_at_stop
from server.cancel import cancellable
from server.jobs import Event, GenerationJob, GenerationResult, abandoned, timeout_error


def batchable(job: GenerationJob) -> bool:
    """Greedy and not streamed: may share a ``generate`` call with compatible jobs."""
    return not job.stream and not job.sampling.get("do_sample", False)


def compatible(first: GenerationJob, other: GenerationJob) -> bool:
    """``other`` may join ``first``'s batch: both batchable, same patching flag, profile and gate object."""
    return (batchable(first) and batchable(other) and first.patching == other.patching
            and first.gate is other.gate and first.profile == other.profile)


class RowHalt(StoppingCriteria):
    """Per row: stop at the row's ``max_new_tokens``, at a stop string, or once the row is abandoned.

    ``prompts`` is the left-padded ``(batch, width)`` prompt tensor of ``jobs``. A call may see all rows (the
    main ``generate``) or only the patched ones (the patched continuation, through a caller view); see
    :meth:`rows_of`. Rows stopped because they were abandoned are remembered in ``abandoned_rows``.
    """

    def __init__(self, jobs: Sequence[GenerationJob], prompts: torch.Tensor, tokenizer: PreTrainedTokenizerBase):
        self.jobs, self.prompts, self.tokenizer = list(jobs), prompts, tokenizer
        self.width = int(prompts.shape[1])
        self.abandoned_rows: set[int] = set()

    def rows_of(self, input_ids: torch.Tensor) -> list[int]:
        """The batch row of each row of ``input_ids``, matched by prompt in order (patched rows keep their order).

        Rows with the same prompt are matched in order; they get the same gate decision (same prompt, same
        gate), so they are patched together or not at all and the order is right.
        """
        if input_ids.shape[0] == len(self.jobs):
            return list(range(len(self.jobs)))
        prompts = self.prompts.to(input_ids.device)
        same = (input_ids[:, None, : self.width] == prompts[None]).all(-1).tolist()  # (rows, batch)
        rows, after = [], -1
        for matches in same:
            after = next((j for j in range(after + 1, len(self.jobs)) if matches[j]), -1)
            rows.append(after)
        return rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        flags = [True if row < 0 else self._done(row, input_ids[k, self.width :]) for k, row in
                 enumerate(self.rows_of(input_ids))]
        return cast(torch.BoolTensor, torch.tensor(flags, dtype=torch.bool, device=input_ids.device))

    def _done(self, row: int, new: torch.Tensor) -> bool:
        job = self.jobs[row]
        if abandoned(job):
            self.abandoned_rows.add(row)
            return True
        if new.shape[0] >= job.max_new_tokens:
            return True
        stops = [s for s in job.stop if s]
        if not stops:
            return False
        text = cast(str, self.tokenizer.decode(new.tolist(), skip_special_tokens=True))
        return any(s in text for s in stops)

    def all_abandoned(self) -> bool:
        return all(abandoned(job) for job in self.jobs)


def left_padded(jobs: Sequence[GenerationJob], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The jobs' prompts as one left-padded ``(input_ids, attention_mask)`` pair (:func:`autopatch.prefix_cache.left_pad`)."""
    return left_pad([torch.tensor(job.prompt_ids, dtype=torch.long) for job in jobs], pad)


def answer_ids(new: list[int], pad: int, eos: set[int]) -> list[int]:
    """A row's generated tokens: up to and including the first EOS, else without the trailing padding."""
    for i, token in enumerate(new):
        if token in eos:
            return new[: i + 1]
    while new and new[-1] == pad:
        new = new[:-1]
    return new


def result_of(job: GenerationJob, ids: list[int], tokenizer: PreTrainedTokenizerBase, eos: set[int],
              report: dict) -> GenerationResult:
    """The answer text (cut before the first stop string), its finish reason and token counts."""
    text, stopped = cut_at_stop(cast(str, tokenizer.decode(ids, skip_special_tokens=True)), job.stop)
    finish = finish_reason(ids, stopped=stopped, eos=eos, max_new_tokens=job.max_new_tokens)
    return GenerationResult(text, finish, len(job.prompt_ids), len(ids), report)


def finish_reason(ids: Sequence[int], *, stopped: bool, eos: set[int], max_new_tokens: int) -> str:
    """OpenAI's ``finish_reason``: "stop" at a stop string or EOS, "length" when the token budget ran out."""
    if stopped or (ids and ids[-1] in eos):
        return "stop"
    return "length" if len(ids) >= max_new_tokens else "stop"


def run_batch(model, tokenizer: PreTrainedTokenizerBase, jobs: Sequence[GenerationJob], *, control=None,
              eos: set[int] | None = None) -> list[Event | None]:
    """Generate every job in one call; per job ``("done", result)``, ``("error", 504)`` or ``None`` (cancelled).

    The jobs must be :func:`compatible` with the first (a single job may also sample). Raises
    :class:`server.cancel.Cancelled` when every job was abandoned mid-forward.
    """
    first = jobs[0]
    pad = cast(int, tokenizer.pad_token_id)
    eos = eos if eos is not None else set()
    prompts, mask = left_padded(jobs, pad)
    halt = RowHalt(jobs, prompts, tokenizer)
    device = next(model.parameters()).device
    patcher = AutoPatcher(model, tokenizer, first.profile, first.gate, control=control)
    if first.seed is not None and len(jobs) == 1:
        torch.manual_seed(first.seed)
    sampling: dict[str, Any] = first.sampling if len(jobs) == 1 else {"do_sample": False}
    with cancellable(model, halt.all_abandoned):
        result = patcher.generate_with_reports(prompts.to(device), attention_mask=mask.to(device),
                                               max_new_tokens=max(job.max_new_tokens for job in jobs),
                                               pad_token_id=pad, stopping_criteria=StoppingCriteriaList([halt]),
                                               questions=[job.question for job in jobs], patching=first.patching,
                                               **sampling)
    sequences = result.output if isinstance(result.output, torch.Tensor) else result.output.sequences
    events: list[Event | None] = []
    for i, job in enumerate(jobs):
        if job.cancelled.is_set():
            events.append(None)
        elif i in halt.abandoned_rows:
            events.append(("error", timeout_error()))
        else:
            ids = answer_ids(sequences[i, halt.width :].tolist(), pad, eos)
            report = result.reports[i].to_dict() if i < len(result.reports) else {}
            events.append(("done", result_of(job, ids, tokenizer, eos, report)))
    return events
