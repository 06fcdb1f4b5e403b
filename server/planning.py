"""Planning a request: validate it, render and tokenize the prompt, and build the worker's job.

Example:
    >>> from server.planning import plan
    >>> job = plan(served, body, emit, deadline=time.monotonic() + 120)   # raises ApiError (400/404) when refused
    >>> served.worker.submit(job)

Everything that can be refused (400, 404) is refused here, before the queue.
The app runs :func:`plan` on its own single preparation thread (``Served.prep``),
never on the event loop: rendering a chat template and tokenizing a body of
several megabytes take long enough to stall every other connection, ``/health``
included. One thread, because the app's copy of the tokenizer (a fast
tokenizer) must not be used from two threads at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

from autopatch.errors import ConfigError, ProfileError
from autopatch.gating import Gate
from autopatch.patcher import AutoPatcher
from server.errors import ApiError, invalid_request
from server.jobs import Event, GenerationJob
from server.prompting import build_prompt
from server.schemas import AutopatchOptions, ChatCompletionRequest
from server.worker import GenerationWorker

logger = logging.getLogger("autopatch.server")

SAMPLING_EPS = 1e-5  # below this temperature, sampling is greedy (as in vLLM); 1e-300 would overflow the softmax


@dataclass
class Served:
    """What every request needs: the model's name and limits, the base patcher, the worker."""

    name: str
    created: int
    base: AutoPatcher
    tokenizer: PreTrainedTokenizerBase  # the preparation thread's copy; the worker uses the original
    worker: GenerationWorker
    context_length: int
    max_tokens_cap: int
    default_max_tokens: int
    request_timeout_s: float
    patching_default: bool
    max_prompt_tokens: int | None = None  # None: only the context length limits the prompt
    prep: ThreadPoolExecutor | None = None  # the one thread that renders and tokenizes (see the module docstring)


def context_length_of(model, tokenizer: PreTrainedTokenizerBase) -> int:
    """The model's context window: its config's position limit, else the tokenizer's, else 2048."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else 2048


def gate_with_threshold(gate: Gate, threshold: float) -> Gate:
    """``gate.with_threshold(threshold)``: a copy, so the served gate itself is never modified; a 400 naming the
    gate when it has no threshold to override."""
    with_threshold = getattr(gate, "with_threshold", None)
    why = f"this server's gate ({type(gate).__name__}) has no threshold"
    if with_threshold is not None:
        try:
            return cast(Gate, with_threshold(threshold))
        except ConfigError as err:
            why = str(err)
    raise invalid_request(f"autopatch.threshold needs a learned gate with one threshold, but {why}.",
                          param="autopatch.threshold")


def unknown_model(requested: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{requested[:200]}' does not exist; this server serves '{served}'.",
                    type="not_found_error", param="model", code="model_not_found")


def _prompt_too_long(message: str) -> ApiError:
    return ApiError(400, message, type="context_length_exceeded", param="messages", code="context_length_exceeded")


def plan(served: Served, body: ChatCompletionRequest, emit: Callable[[Event], None], *,
         deadline: float | None = None) -> GenerationJob:
    """The job for ``body``, or an :class:`ApiError` saying why it is refused; ``emit`` receives its events."""
    if body.model is not None and body.model != served.name:
        raise unknown_model(body.model, served.name)
    unsupported = body.unsupported_field()
    if unsupported is not None:
        raise invalid_request(f"{unsupported!r} is not supported by this server (it would be ignored, and the answer "
                              "would not be what the field asks for); remove it.", param=unsupported,
                              code="unsupported_parameter")
    ignored = body.ignored_fields()
    if ignored:
        shown = ", ".join(repr(name[:40]) for name in ignored[:20])
        shown += f" and {len(ignored) - 20} more" if len(ignored) > 20 else ""
        logger.warning("ignoring request fields this server does not implement: %s", shown)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = build_prompt(messages, served.tokenizer, served.base.profile.prompt_format)
    ids = served.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens).input_ids
    n, ctx = len(ids), served.context_length
    if n >= ctx:
        raise _prompt_too_long(f"This model's maximum context length is {ctx} tokens, but the messages use {n} "
                               "tokens (and the answer needs at least one more). Shorten the messages.")
    if served.max_prompt_tokens is not None and n > served.max_prompt_tokens:
        raise _prompt_too_long(f"The messages use {n} tokens, over this server's limit of {served.max_prompt_tokens} "
                               "prompt tokens (autopatch serve --max-prompt-tokens). Shorten the messages.")
    max_new = _token_budget(served, body, n)

    options = body.autopatch or AutopatchOptions()
    profile, gate = served.base.profile, served.base.gate
    if options.strategy is not None and options.strategy != profile.strategy:
        try:
            profile = replace(profile, strategy=options.strategy)
        except ProfileError as err:
            raise invalid_request(f"Cannot use strategy '{options.strategy}' with this model's profile: {err}",
                                  param="autopatch.strategy") from None
    if options.threshold is not None:
        gate = gate_with_threshold(gate, options.threshold)

    if body.temperature is not None and body.temperature >= SAMPLING_EPS:
        sampling: dict[str, Any] = {"do_sample": True, "temperature": body.temperature}
        if body.top_p is not None:
            sampling["top_p"] = body.top_p
    else:
        sampling = {"do_sample": False}
    return GenerationJob(prompt_ids=list(ids), question=prompt.question, max_new_tokens=max_new, profile=profile,
                         gate=gate, patching=options.enabled if options.enabled is not None else served.patching_default,
                         emit=emit, sampling=sampling, seed=body.seed, stop=[*body.stop_strings(), *prompt.stop],
                         stream=bool(body.stream), deadline=deadline)


def _token_budget(served: Served, body: ChatCompletionRequest, prompt_tokens: int) -> int:
    remaining = served.context_length - prompt_tokens
    limit = body.token_limit()
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if limit is None:
        return min(served.default_max_tokens, served.max_tokens_cap, remaining)
    if limit > served.max_tokens_cap:
        raise invalid_request(f"{param}={limit} is above this server's cap of {served.max_tokens_cap} tokens.",
                              param=param)
    if limit > remaining:
        raise invalid_request(f"{param}={limit} does not fit: the model's context is {served.context_length} tokens and "
                              f"the messages use {prompt_tokens}, so at most {remaining} tokens can be generated.",
                              param=param, code="context_length_exceeded")
    return limit
