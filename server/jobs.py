"""What the event loop hands the generation worker, and what comes back.

Example:
    >>> job = GenerationJob(prompt_ids=ids, question=q, max_new_tokens=16, profile=profile, gate=gate,
    ...                     patching=True, emit=emit, deadline=time.monotonic() + 120)
    >>> abandoned(job)                    # cancelled (timeout, client gone) or past its deadline
    False

Built and validated on the event loop (:mod:`server.app`), run by
:mod:`server.worker` (alone or in a batch, :mod:`server.batching`). Events go
back through ``job.emit``: ``("delta", str)`` while streaming, then
``("done", GenerationResult)`` or ``("error", ApiError)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autopatch.gating import Gate
from autopatch.profile import PatchProfile
from server.errors import ApiError

logger = logging.getLogger("autopatch.server")

Event = tuple[str, Any]  # ("delta", str) | ("done", GenerationResult) | ("error", ApiError)


@dataclass
class GenerationJob:
    """Everything the worker needs for one request; built and validated on the event loop.

    ``deadline`` is a ``time.monotonic()`` time after which nobody waits for the answer (the server's
    ``--timeout``); ``cancelled`` is set by the event loop on timeout or when the client disconnects.
    """

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
    deadline: float | None = None
    answered: bool = False  # its "done" event was emitted (a batch may answer some rows before the others)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    report: dict


def timeout_error() -> ApiError:
    """The 504 a request gets when its deadline passes before its answer is ready."""
    return ApiError(504, "The request timed out waiting for the model (queueing plus generation); retry later "
                         "or ask for fewer tokens (autopatch serve --timeout sets the limit).",
                    type="timeout_error", code="timeout")


def expired(job: GenerationJob) -> bool:
    """The job's deadline has passed."""
    return job.deadline is not None and time.monotonic() > job.deadline


def abandoned(job: GenerationJob) -> bool:
    """Nobody will read this job's answer: cancelled (timeout, client gone) or past its deadline."""
    return job.cancelled.is_set() or expired(job)


def safe_emit(job: GenerationJob, event: Event) -> None:
    """Hand ``event`` to the job's receiver; a receiver that is gone (client left, server stopping) is not an error."""
    try:
        job.emit(event)
    except Exception:
        logger.debug("could not deliver a %s event", event[0], exc_info=True)
