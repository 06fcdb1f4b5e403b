"""The one generation thread: every request's ``AutoPatcher.generate`` runs here, alone or in a micro-batch.

Example:
    >>> worker = GenerationWorker(model, tok, max_queue=32, max_batch_size=8, batch_window_s=0.01)
    >>> worker.start()
    >>> worker.submit(job)            # raises ApiError(503) when max_queue jobs are already waiting
    >>> worker.close()

Why one thread: autopatch's capture and patch hooks are registered on the
model's modules, so two generations running at once would see each other's
hooks. A single consumer of a bounded queue makes that impossible and keeps
the event loop free of model work. Results and streamed text go back through
``job.emit`` (thread-safe; the app passes a function that hands each event to
the event loop).

Micro-batching: when the worker takes a greedy, non-streamed job, it waits up
to ``batch_window_s`` for more jobs that can share its ``generate`` call
(:func:`server.batching.compatible`) and runs up to ``max_batch_size`` of them
as one left-padded batch (:func:`server.batching.run_batch`). Streamed and
sampled jobs run alone. Jobs that cannot join stay queued, in order.

A job's ``cancelled`` event (set on timeout or client disconnect) and its
``deadline`` make the worker skip the job if it has not started, stop its row
at the next token if it has, and abort a forward pass (prefill included) once
every job in it is abandoned (:mod:`server.cancel`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from autopatch.errors import ConfigError
from autopatch.kernels import release_openmp_pool
from autopatch.patcher import AutoPatcher
from autopatch.stopping import cut_at_stop
from server.batching import batchable, compatible, finish_reason, run_batch
from server.cancel import Cancelled, cancellable
from server.errors import ApiError, internal_error
from server.jobs import Event, GenerationJob, GenerationResult, abandoned, expired, timeout_error

logger = logging.getLogger("autopatch.server")

__all__ = ["AnswerStream", "Event", "GenerationJob", "GenerationResult", "GenerationWorker"]


class AnswerStream:
    """A ``generate`` streamer that collects the answer's tokens, cuts at stop strings and emits text deltas.

    It skips the first ``put`` (the prompt), as HF's ``TextStreamer(skip_prompt=True)`` does.
    AutoPatcher forwards the vanilla tokens when a row is not patched and the
    patched continuation's tokens when it is, so this sees exactly the answer.
    A delta is held back while it might be the start of a stop string or ends
    in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (),
                 on_delta: Callable[[str], None] | None = None):
        self.tokenizer, self.stop, self.on_delta = tokenizer, [s for s in stop if s], on_delta
        self.ids: list[int] = []
        self.stopped = False  # a stop string was produced
        self._prompt_skipped = False
        self._sent = 0
        self._final: str | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_skipped:
            self._prompt_skipped = True
            return
        if self.stopped:
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
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

    def end(self) -> None:
        pass  # the worker calls finish() once generate has returned

    def finish(self) -> str:
        """The answer text (cut at the first stop string); emits whatever was held back."""
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


class _Halt(StoppingCriteria):
    """Stops generation once ``should_stop()`` (stop string seen, request cancelled)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return cast(torch.BoolTensor, torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool,
                                                device=input_ids.device))


def _eos_ids(model, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class GenerationWorker:
    """Runs :class:`GenerationJob` s on a single background thread, compatible greedy ones in micro-batches."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, *, control=None, max_queue: int = 32,
                 max_batch_size: int = 8, batch_window_s: float = 0.01):
        if max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        if max_batch_size < 1:
            raise ConfigError("max_batch_size must be at least 1 (1 turns batching off)")
        if batch_window_s < 0:
            raise ConfigError("batch_window_s must be 0 or more seconds")
        self.model, self.tokenizer, self.control = model, tokenizer, control
        self.max_queue, self.max_batch_size, self.batch_window_s = max_queue, max_batch_size, batch_window_s
        self._pending: deque[GenerationJob] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="autopatch-generate", daemon=True)
        self._closed = False
        self._eos = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device

    # ---- control --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; after :meth:`close`, start a fresh one (an app can be started again).

        The starting thread's idle OpenMP pool is released first (:func:`autopatch.kernels.release_openmp_pool`):
        the worker is the thread that runs the model from now on.
        """
        release_openmp_pool()
        with self._cond:
            self._closed = False
        if not self._thread.is_alive():
            if self._thread.ident is not None:  # a thread object runs only once
                self._thread = threading.Thread(target=self._loop, name="autopatch-generate", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def depth(self) -> int:
        """Jobs waiting (those being generated are not counted)."""
        return len(self._pending)

    def submit(self, job: GenerationJob) -> None:
        with self._cond:
            if self._closed:
                raise ApiError(503, "The server is shutting down.", type="unavailable_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                self._pending = deque(j for j in self._pending if not j.cancelled.is_set())  # clients that left
            if len(self._pending) >= self.max_queue:
                raise ApiError(503, f"The server is busy: {self.max_queue} requests are already waiting. Retry "
                                    "shortly.", type="unavailable_error", code="queue_full", headers={"Retry-After": "1"})
            self._pending.append(job)
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones with 503, and stop the thread after the current batch."""
        with self._cond:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in waiting:
            _safe_emit(job, ("error", ApiError(503, "The server is shutting down.", type="unavailable_error",
                                               code="shutting_down")))
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- the thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[GenerationJob] | None:
        """The next job and the compatible ones that arrive within the batch window; ``None`` once closed."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            if self._skip(first):
                return []
            batch = [first]
            if not batchable(first) or self.max_batch_size == 1:
                return batch
            end = time.monotonic() + self.batch_window_s
            while True:
                self._take_compatible(batch)
                remaining = end - time.monotonic()
                if len(batch) >= self.max_batch_size or remaining <= 0 or self._closed:
                    return batch
                self._cond.wait(remaining)

    def _take_compatible(self, batch: list[GenerationJob]) -> None:
        """Move waiting jobs that can join ``batch`` into it (up to the size limit); the others keep their order."""
        kept: deque[GenerationJob] = deque()
        while self._pending:
            job = self._pending.popleft()
            if len(batch) < self.max_batch_size and compatible(batch[0], job):
                if not self._skip(job):
                    batch.append(job)
            else:
                kept.append(job)
        self._pending = kept

    @staticmethod
    def _skip(job: GenerationJob) -> bool:
        """A job nobody waits for any more is dropped before it starts (with a 504 if only its deadline passed)."""
        if job.cancelled.is_set():
            return True
        if expired(job):
            _safe_emit(job, ("error", timeout_error()))
            return True
        return False

    def _run(self, jobs: list[GenerationJob]) -> None:
        """Run one batch and deliver its events; a failing batch of several is retried one job at a time."""
        try:
            if len(jobs) == 1 and jobs[0].stream:
                events: list[Event | None] = [self.run(jobs[0])]
            else:
                events = run_batch(self.model, self.tokenizer, jobs, control=self.control, eos=self._eos)
        except Cancelled:
            events = [None if job.cancelled.is_set() else ("error", timeout_error()) for job in jobs]
        except ApiError as err:
            events = [("error", err)] * len(jobs)
        except Exception:  # the thread must survive anything a request can trigger
            if len(jobs) > 1:
                logger.warning("a batch of %d requests failed; running them one at a time", len(jobs), exc_info=True)
                for job in jobs:
                    self._run([job])
                return
            logger.exception("generation failed")
            events = [("error", internal_error())]
        for job, event in zip(jobs, events):
            if event is not None:
                _safe_emit(job, event)

    def run(self, job: GenerationJob) -> Event | None:
        """Generate one streamed answer (on the calling thread); ``None`` when the job was cancelled meanwhile."""
        stream = AnswerStream(self.tokenizer, job.stop,
                              on_delta=(lambda text: _safe_emit(job, ("delta", text))) if job.stream else None)
        cut_short: list[bool] = []  # set when the deadline or a cancellation stopped generation

        def should_stop() -> bool:
            if abandoned(job):
                cut_short.append(True)
                return True
            return stream.stopped

        halt = _Halt(should_stop)
        patcher = AutoPatcher(self.model, self.tokenizer, job.profile, job.gate, control=self.control)
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        if job.seed is not None:
            torch.manual_seed(job.seed)
        with cancellable(self.model, lambda: abandoned(job)):
            result = patcher.generate_with_reports(ids, attention_mask=torch.ones_like(ids),
                                                   max_new_tokens=job.max_new_tokens,
                                                   pad_token_id=self.tokenizer.pad_token_id, streamer=stream,
                                                   stopping_criteria=StoppingCriteriaList([halt]),
                                                   questions=[job.question], patching=job.patching, **job.sampling)
        if job.cancelled.is_set():
            return None
        if cut_short:
            return ("error", timeout_error())  # stopped by the deadline: the answer is cut short
        text = stream.finish()
        finish = finish_reason(stream.ids, stopped=stream.stopped, eos=self._eos, max_new_tokens=job.max_new_tokens)
        report = result.reports[0].to_dict() if result.reports else {}
        return ("done", GenerationResult(text, finish, len(job.prompt_ids), len(stream.ids), report))


def _safe_emit(job: GenerationJob, event: Event) -> None:
    try:
        job.emit(event)
    except Exception:  # the receiving loop may be gone (client left, server stopping)
        logger.debug("could not deliver a %s event", event[0], exc_info=True)
