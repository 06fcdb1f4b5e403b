"""The one generation thread: every request's ``AutoPatcher.generate`` runs here, alone or in a micro-batch.

Example:
    >>> worker = GenerationWorker(model, tok, max_queue=32, max_batch_size=8, window=BatchWindow(gap_s=0.01))
    >>> worker.start()
    >>> worker.submit(job)            # raises ApiError(503) when max_queue jobs are already waiting
    >>> worker.close()

Why one thread: autopatch's hooks act only on the thread that opened them, so
threads could generate at once, but on a CPU two batches at once share the same
cores where one batch shares one forward pass, and any Python work beside a
generation slows it (it takes the interpreter lock back after every torch
operation; docs/server.md). A single consumer of a bounded queue also keeps the
event loop free of model work. Results and streamed text go back through
``job.emit`` (thread-safe; the app passes a function that hands each event to
the event loop).

Micro-batching: when the worker takes a greedy job, streamed or not, it holds
the batch open for more jobs that can share its ``generate`` call
(:func:`server.batching.compatible`) and runs up to ``max_batch_size`` of them
as one left-padded batch (:func:`server.batching.run_batch`, which also streams
the rows that asked for it). How long it holds it is :class:`BatchWindow`'s
rule: until no job has joined for ``gap_s``, but while the batch is smaller
than the one that just ended, or than the jobs already accepted and being
prepared would make it (:meth:`GenerationWorker.preparing`), up to
``max_wait_s`` (those jobs are on their way; a lone client still waits only
``gap_s``). Sampled
jobs run alone, through the same call. Jobs that cannot join stay queued, in
order.

A job's ``cancelled`` event (set on timeout or client disconnect) and its
``deadline`` make the worker skip the job if it has not started, stop its row
at the next token if it has, and abort a forward pass (prefill included) once
every job in it is abandoned (:mod:`server.cancel`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from autopatch.errors import ConfigError
from autopatch.kernels import release_openmp_pool
from server.batching import batchable, compatible, run_batch
from server.cancel import Cancelled
from server.errors import ApiError, internal_error
from server.jobs import Event, GenerationJob, GenerationResult, expired, safe_emit, timeout_error

logger = logging.getLogger("autopatch.server")

__all__ = ["BatchWindow", "Event", "GenerationJob", "GenerationResult", "GenerationWorker"]


@dataclass(frozen=True)
class BatchWindow:
    """When a forming batch closes: ``gap_s`` after the last job joined, or, while it is smaller than a batch that
    ended less than ``recent_s`` ago, ``max_wait_s`` after its first job; never later than that.

    Example:
        >>> window = BatchWindow(gap_s=0.01, max_wait_s=0.1)
        >>> window.closes_at(opened=0.0, joined=0.0, size=1, expected=1)   # a lone request waits the gap only
        0.01
        >>> window.closes_at(opened=0.0, joined=0.02, size=3, expected=8)  # 8 clients just had their answers
        0.1

    Why the expected size: clients whose answers just came back send their next requests over the next tens of
    milliseconds (more under load: their HTTP round trip shares the cores with the model); a fixed gap closes
    the batch before most of them arrive, and they wait for the next whole batch instead.
    """

    gap_s: float = 0.01
    max_wait_s: float = 0.1
    recent_s: float = 1.0

    def __post_init__(self) -> None:
        if min(self.gap_s, self.max_wait_s, self.recent_s) < 0:
            raise ConfigError("batch window times must be 0 or more seconds")

    def closes_at(self, *, opened: float, joined: float, size: int, expected: int) -> float:
        """The time the batch closes, given when its first job was taken (``opened``) and its last joined."""
        cap = opened + max(self.gap_s, self.max_wait_s)
        return cap if size < expected else min(cap, joined + self.gap_s)

    def expected(self, last_size: int, last_ended: float, now: float) -> int:
        """The size to wait for: the last batch's, when it ended within ``recent_s``; else 1."""
        return last_size if now - last_ended <= self.recent_s else 1


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
                 max_batch_size: int = 8, window: BatchWindow | None = None):
        if max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        if max_batch_size < 1:
            raise ConfigError("max_batch_size must be at least 1 (1 turns batching off)")
        self.model, self.tokenizer, self.control = model, tokenizer, control
        self.max_queue, self.max_batch_size, self.window = max_queue, max_batch_size, window or BatchWindow()
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size started (benchmarks read it)
        self._last = (0, float("-inf"))  # the last batch's size and when it ended
        self._preparing = 0  # requests accepted and being prepared: jobs on their way (see preparing)
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

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around a request's preparation and its :meth:`submit`: while it lasts, a forming batch counts the job as
        on its way and holds for it (within the window's ``max_wait_s``), as it does for the last batch's clients."""
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
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
                self.batch_sizes[len(batch)] += 1  # before its answers go out: a reader who has them sees it
                self._run(batch)
                self._last = (len(batch), time.monotonic())

    def _next_batch(self) -> list[GenerationJob] | None:
        """The next job and the compatible ones that join it before :class:`BatchWindow` closes it; ``None`` once
        closed."""
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
            opened = joined = time.monotonic()
            recent = self.window.expected(*self._last, now=opened)
            while True:
                size = len(batch)
                self._take_compatible(batch)
                now = time.monotonic()
                joined = now if len(batch) > size else joined
                expected = min(self.max_batch_size, max(recent, len(batch) + self._preparing))
                remaining = self.window.closes_at(opened=opened, joined=joined, size=len(batch),
                                                  expected=expected) - now
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
        """Run one batch and deliver its events (those of the rows it answered early are already out); a failing
        batch of several is retried one job at a time, but for the jobs already answered."""
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
                    if job.answered:  # answered before the failure (a row the gate left alone)
                        continue
                    if job.stream:  # part of its text may have been sent: a second run would send it again
                        safe_emit(job, ("error", internal_error()))
                    else:
                        self._run([job])
                return
            logger.exception("generation failed")
            events = [("error", internal_error())]
        for job, event in zip(jobs, events):
            if event is not None and not job.answered:
                safe_emit(job, event)


