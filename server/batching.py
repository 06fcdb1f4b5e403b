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
request never touches the others: each row ends where it would have ended
alone, and once half of a batch's rows have ended the others go on without them
(:mod:`autopatch.shrinking`). A patched row is answered from a
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

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from autopatch.patcher import AutoPatcher
from autopatch.prefix_cache import left_pad
from autopatch.stopping import cut_at_stop
from server.cancel import cancellable
from server.jobs import Event, GenerationJob, GenerationResult, abandoned, safe_emit, timeout_error


def batchable(job: GenerationJob) -> bool:
    """Greedy (streamed or not): may share a ``generate`` call with compatible jobs."""
    return not job.sampling.get("do_sample", False)


def compatible(first: GenerationJob, other: GenerationJob) -> bool:
    """``other`` may join ``first``'s batch: both batchable, same patching flag, profile and gate object."""
    return (batchable(first) and batchable(other) and first.patching == other.patching
            and first.gate is other.gate and first.profile == other.profile)


class AnswerStream:
    """One answer's text as it grows: cuts at stop strings and emits text deltas.

    :meth:`advance` is given the answer's tokens so far (a batch row's, from :class:`RowHalt`), never the prompt's.
    A delta is held back while it might be the start of a stop string or ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (),
                 on_delta: Callable[[str], None] | None = None):
        self.tokenizer, self.stop, self.on_delta = tokenizer, [s for s in stop if s], on_delta
        self.ids: list[int] = []
        self.stopped = False  # a stop string was produced
        self._sent = 0
        self._final: str | None = None

    def advance(self, ids: Sequence[int]) -> None:
        """The answer is ``ids`` so far (it only ever grows); emit what is now certain."""
        if self.stopped:
            return
        self.ids = list(ids)
        if not self.stop and self.on_delta is None:
            return
        text = self._decode()
        final, stopped = cut_at_stop(text, self.stop)
        if stopped:
            cut = len(final)
            self.stopped, self._final = True, final
            self._emit(self._final[self._sent:] if cut > self._sent else "")
            self._sent = max(self._sent, cut)
            return
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        if safe > self._sent:
            self._emit(text[self._sent:safe])
            self._sent = safe

    def finish(self) -> str:
        """The answer text (cut at the first stop string); emits whatever was held back (called once the row's
        generation has ended)."""
        if self._final is None:
            self._final = self._decode()
        if len(self._final) > self._sent:
            self._emit(self._final[self._sent:])
            self._sent = len(self._final)
        return self._final

    def _decode(self) -> str:
        return cast(str, self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        if text and self.on_delta is not None:
            self.on_delta(text)


class RowHalt(StoppingCriteria):
    """Per row: stop at the row's ``max_new_tokens``, at a stop string, or once the row is abandoned; and stream
    the text of the rows whose job asked for a stream.

    ``prompts`` is the left-padded ``(batch, width)`` prompt tensor of ``jobs``. A call may see all rows (the
    main ``generate``) or only the patched ones (the patched continuation, through a caller view); see
    :meth:`rows_of`. Rows stopped because they were abandoned are remembered in ``abandoned_rows``.

    A streamed row's text is emitted one token behind what the row holds (:func:`confirmed_ids`): a row the gate
    patches makes exactly one unpatched token before it ends, and that token is never sent; its answer streams
    from the patched continuation. :meth:`finish` sends what was held back.
    """

    def __init__(self, jobs: Sequence[GenerationJob], prompts: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                 *, pad: int | None = None, eos: set[int] | None = None):
        self.jobs, self.prompts, self.tokenizer = list(jobs), prompts, tokenizer
        self.width = int(prompts.shape[1])
        self.abandoned_rows: set[int] = set()
        self.pad, self.eos = pad, eos or set()
        self.streams = {row: AnswerStream(tokenizer, job.stop, on_delta=_delta_to(job))
                        for row, job in enumerate(self.jobs) if job.stream}

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
        flags = []
        for k, row in enumerate(self.rows_of(input_ids)):
            if row < 0:
                flags.append(True)
                continue
            new = input_ids[k, self.width :]
            if row in self.streams:
                self.streams[row].advance(confirmed_ids(new.tolist(), self.pad, self.eos))
            flags.append(self._done(row, new))
        return cast(torch.BoolTensor, torch.tensor(flags, dtype=torch.bool, device=input_ids.device))

    def finish(self, row: int, ids: list[int]) -> None:
        """The row's answer is ``ids``: a streamed row sends the rest of its text."""
        if row in self.streams:
            self.streams[row].advance(ids)
            self.streams[row].finish()

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


def confirmed_ids(new: list[int], pad: int | None, eos: set[int]) -> list[int]:
    """The tokens of a row that are certain to be its answer's: the row's tokens without trailing padding, less
    the last one (the one token a patched row makes before the gate's choice ends it), up to the first EOS."""
    while new and new[-1] == pad:
        new = new[:-1]
    return answer_ids(new[:-1], -1 if pad is None else pad, eos)


def _delta_to(job: GenerationJob) -> Callable[[str], None]:
    return lambda text: safe_emit(job, ("delta", text))


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
    """Generate every job in one call; per job ``("done", result)``, ``("error", 504)`` or ``None`` (cancelled, or
    already answered).

    A row the gate leaves alone is answered as soon as the unpatched generation ends (``on_final`` of
    :meth:`AutoPatcher.generate_with_reports`): its ``done`` event is emitted there, the job is marked
    ``answered``, and its place in the returned list is ``None``. The patched rows are answered at the end.

    The jobs must be :func:`compatible` with the first (a single job may also sample). Raises
    :class:`server.cancel.Cancelled` when every job was abandoned mid-forward.
    """
    first = jobs[0]
    pad = cast(int, tokenizer.pad_token_id)
    eos = eos if eos is not None else set()
    prompts, mask = left_padded(jobs, pad)
    halt = RowHalt(jobs, prompts, tokenizer, pad=pad, eos=eos)
    device = next(model.parameters()).device
    patcher = AutoPatcher(model, tokenizer, first.profile, first.gate, control=control)
    if first.seed is not None and len(jobs) == 1:
        torch.manual_seed(first.seed)
    sampling: dict[str, Any] = first.sampling if len(jobs) == 1 else {"do_sample": False}
    answered: set[int] = set()

    def event_of(i: int, sequences: torch.Tensor, report: dict) -> Event | None:
        job = jobs[i]
        if job.cancelled.is_set():
            return None
        if i in halt.abandoned_rows:
            return ("error", timeout_error())
        ids = answer_ids(sequences[i, halt.width :].tolist(), pad, eos)
        halt.finish(i, ids)
        return ("done", result_of(job, ids, tokenizer, eos, report))

    def deliver_now(rows: list[int], sequences: torch.Tensor, reports: list) -> None:
        """The rows the gate left alone are answered: their clients need not wait for the patched rows."""
        for i in rows:
            event = event_of(i, sequences, reports[i].to_dict())
            if event is not None and event[0] == "done":
                jobs[i].answered = True
                answered.add(i)
                safe_emit(jobs[i], event)

    with cancellable(model, halt.all_abandoned):
        result = patcher.generate_with_reports(prompts.to(device), attention_mask=mask.to(device),
                                               max_new_tokens=max(job.max_new_tokens for job in jobs),
                                               pad_token_id=pad, stopping_criteria=StoppingCriteriaList([halt]),
                                               questions=[job.question for job in jobs], patching=first.patching,
                                               on_final=deliver_now, **sampling)
    sequences = result.output if isinstance(result.output, torch.Tensor) else result.output.sequences
    return [None if i in answered else event_of(i, sequences, result.reports[i].to_dict() if i < len(result.reports) else {})
            for i in range(len(jobs))]
