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

Micro-batching: when the worker takes a greedy job, streamed or not, it waits
up to ``batch_window_s`` for more jobs that can share its ``generate`` call
(:func:`server.batching.compatible`) and runs up to ``max_batch_size`` of them
as one left-padded batch (:func:`server.batching.run_batch`, which also streams
the rows that asked for it). Sampled jobs run alone, through the same call.
Jobs that cannot join stay queued, in order.

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

from transformers import PreTrainedTokenizerBase

from autopatch.errors import ConfigError
from autopatch.kernels import release_openmp_pool
from server.batching import batchable, compatible, run_batch
from server.cancel import Cancelled
from server.errors import ApiError, internal_error
from server.jobs import Event, GenerationJob, GenerationResult, expired, safe_emit, timeout_error

logger = logging.getLogger("autopatch.server")

__all__ = ["Event", "GenerationJob", "GenerationResult", "GenerationWorker"]


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
            safe_emit(job, ("error", ApiError(503, "The server is shutting down.", type="unavailable_error",
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
            safe_emit(job, ("error", timeout_error()))
            return True
        return False

    def _run(self, jobs: list[GenerationJob]) -> None:
        """Run one batch and deliver its events; a failing batch of several is retried one job at a time."""
        try:
            events = run_batch(self.model, self.tokenizer, jobs, control=self.control, eos=self._eos)
        except Cancelled:
            events = [None if job.cancelled.is_set() else ("error", timeout_error()) for job in jobs]
        except ApiError as err:
            events = [("error", err)] * len(jobs)
        except Exception:  # the thread must survive anything a request can trigger
            if len(jobs) > 1:
                logger.warning("a batch of %d requests failed; running them one at a time", len(jobs), exc_info=True)
                for job in jobs:
                    if job.stream:  # part of its text may have been sent: a second run would send it again
                        safe_emit(job, ("error", internal_error()))
                    else:
                        self._run([job])
                return
            logger.exception("generation failed")
            events = [("error", internal_error())]
        for job, event in zip(jobs, events):
            if event is not None:
                safe_emit(job, event)


