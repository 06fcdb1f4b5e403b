"""The one generation thread: every request's ``AutoPatcher.generate`` runs here, one at a time.

Example:
    >>> worker = GenerationWorker(model, tok, max_queue=32)
    >>> worker.start()
    >>> worker.submit(job)            # raises ApiError(503) when max_queue jobs are already waiting
    >>> worker.close()

Why one thread: autopatch's capture and patch hooks are registered on the
model's modules, so two generations running at once would see each other's
hooks. A single consumer of a bounded :class:`queue.Queue` makes that
impossible and keeps the event loop free of model work. Results and streamed
text go back through ``job.emit`` (thread-safe; the app passes a function that
hands each event to the event loop).

A job's ``cancelled`` event (set on timeout or client disconnect) makes the
worker skip the job if it has not started, or stop generating at the next
token if it has.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from autopatch.errors import ConfigError
from autopatch.gating import Gate
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from server.errors import ApiError, internal_error

logger = logging.getLogger("autopatch.server")

Event = tuple[str, Any]  # ("delta", str) | ("done", GenerationResult) | ("error", ApiError)


@dataclass
class GenerationJob:
    """Everything the worker needs for one request; built and validated on the event loop."""

    prompt_ids: list[int]
    question: str
    max_new_tokens: int
    profile: PatchProfile
    gate: Gate
    patching: bool
    emit: Callable[[Event], None]
    sampling: dict[str, Any] = field(default_factory=lambda: {"do_sample": False})
    seed: int | None = None
    stop: Sequence[str] = ()
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    report: dict


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
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._final = True, text[:cut]
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
    """Runs :class:`GenerationJob` s one at a time on a single background thread."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, *, control=None, max_queue: int = 32):
        if max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        self.model, self.tokenizer, self.control = model, tokenizer, control
        self.max_queue = max_queue
        self._queue: queue.Queue[GenerationJob | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="autopatch-generate", daemon=True)
        self._closed = False
        self._eos = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device

    # ---- control --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; after :meth:`close`, start a fresh one (an app can be started again)."""
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
        """Jobs waiting (the one being generated is not counted)."""
        return self._queue.qsize()

    def submit(self, job: GenerationJob) -> None:
        if self._closed:
            raise ApiError(503, "The server is shutting down.", type="unavailable_error", code="shutting_down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"The server is busy: {self.max_queue} requests are already waiting. Retry shortly.",
                           type="unavailable_error", code="queue_full", headers={"Retry-After": "1"}) from None

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones with 503, and stop the thread after the current job."""
        self._closed = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _safe_emit(job, ("error", ApiError(503, "The server is shutting down.", type="unavailable_error",
                                                   code="shutting_down")))
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)

    # ---- the thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                if self._closed:
                    return
                continue  # a stale stop request: the worker was started again meanwhile
            if job.cancelled.is_set():
                continue
            try:
                result = self.run(job)
            except ApiError as err:
                _safe_emit(job, ("error", err))
            except Exception:  # the thread must survive anything a request can trigger
                logger.exception("generation failed")
                _safe_emit(job, ("error", internal_error()))
            else:
                if result is not None:
                    _safe_emit(job, ("done", result))

    def run(self, job: GenerationJob) -> GenerationResult | None:
        """Generate one answer (on the calling thread); ``None`` when the job was cancelled meanwhile."""
        stream = AnswerStream(self.tokenizer, job.stop,
                              on_delta=(lambda text: _safe_emit(job, ("delta", text))) if job.stream else None)
        halt = _Halt(lambda: stream.stopped or job.cancelled.is_set())
        patcher = AutoPatcher(self.model, self.tokenizer, job.profile, job.gate, control=self.control)
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        if job.seed is not None:
            torch.manual_seed(job.seed)
        result = patcher.generate_with_reports(ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=job.max_new_tokens,
                                               pad_token_id=self.tokenizer.pad_token_id, streamer=stream,
                                               stopping_criteria=StoppingCriteriaList([halt]), questions=[job.question],
                                               patching=job.patching, **job.sampling)
        if job.cancelled.is_set():
            return None
        text = stream.finish()
        if stream.stopped or (stream.ids and stream.ids[-1] in self._eos):
            finish = "stop"
        else:
            finish = "length" if len(stream.ids) >= job.max_new_tokens else "stop"
        report = result.reports[0].to_dict() if result.reports else {}
        return GenerationResult(text, finish, len(job.prompt_ids), len(stream.ids), report)


def _safe_emit(job: GenerationJob, event: Event) -> None:
    try:
        job.emit(event)
    except Exception:  # the receiving loop may be gone (client left, server stopping)
        logger.debug("could not deliver a %s event", event[0], exc_info=True)
