"""``create_app``: an OpenAI-compatible chat-completions server for one model, patched by autopatch.

Example:
    >>> import autopatch, uvicorn
    >>> from server import create_app
    >>> model, tok = autopatch.load_model()
    >>> app = create_app(model, tok, model_name="gemma-3-270m", max_queue=32, request_timeout_s=120)
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/chat/completions`` (plain JSON or SSE streaming),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``. Requests are
validated and tokenized on the event loop (with the app's own copy of the
tokenizer); generation runs on the single worker thread of
:mod:`server.worker`. See ``docs/server.md`` for the request extensions, the
error table and the concurrency model.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, is_dataclass, replace
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from autopatch.errors import ProfileError
from autopatch.gating import Gate
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from server.errors import ApiError, SafeJSONResponse, install_error_handlers, internal_error, invalid_request
from server.guards import RequestGuard
from server.prompting import build_prompt
from server.schemas import AutopatchOptions, ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelCard, ModelList
from server.worker import GenerationJob, GenerationResult, GenerationWorker

logger = logging.getLogger("autopatch.server")

SAMPLING_EPS = 1e-5  # below this temperature, sampling is greedy (as in vLLM); 1e-300 would overflow the softmax
_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 404, 500, 503, 504)}


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
    """A copy of ``gate`` with another ``threshold``; the served gate itself is never modified."""
    if is_dataclass(gate) and not isinstance(gate, type):
        return replace(gate, threshold=threshold)
    clone = copy.copy(gate)
    clone.threshold = threshold  # type: ignore[attr-defined]
    return clone


@dataclass
class _Served:
    """What every request needs: the model's name and limits, the base patcher, the worker."""

    name: str
    created: int
    base: AutoPatcher
    tokenizer: PreTrainedTokenizerBase  # the event loop's copy; the worker uses the original
    worker: GenerationWorker
    context_length: int
    max_tokens_cap: int
    default_max_tokens: int
    request_timeout_s: float
    patching_default: bool


class _RequestLog:
    """ASGI middleware: one log line per request with its status and latency (to the last byte sent)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                logger.info("%s %s -> %d in %.1f ms", scope["method"], scope["path"], status[0],
                            (time.perf_counter() - started) * 1000)

        await self.app(scope, receive, send_logged)


def create_app(model, tokenizer: PreTrainedTokenizerBase, *, model_name: str, profile: PatchProfile | str | None = None,
               gate: Gate | str | None = None, control: str | None = None, max_queue: int = 32,
               request_timeout_s: float = 120.0, max_tokens_cap: int = 1024, default_max_tokens: int = 256,
               context_length: int | None = None, patching_default: bool = True, api_key: str | None = None,
               max_body_bytes: int = 4 * 2**20) -> FastAPI:
    """An app serving ``model`` as ``model_name``; ``profile``/``gate``/``control`` go to :class:`AutoPatcher`.

    ``max_queue`` requests may wait while one generates; more get 503.
    ``request_timeout_s`` bounds queueing plus generation (504 after it).
    ``max_tokens`` may not exceed ``max_tokens_cap`` nor the context left
    after the prompt; when absent it is ``min(default_max_tokens, that)``.
    ``patching_default`` applies when a request does not say ``autopatch.enabled``.
    ``api_key``: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>`` (401 otherwise);
    bodies over ``max_body_bytes`` get 413 (:mod:`server.guards`). The interactive ``/docs`` page is off: it
    loads its assets from a CDN, which an offline machine cannot reach (``/openapi.json`` is served).
    """
    base = AutoPatcher(model, tokenizer, profile, gate, control=control)
    served = _Served(
        name=model_name, created=int(time.time()), base=base, tokenizer=copy.deepcopy(tokenizer),
        worker=GenerationWorker(model, tokenizer, control=control, max_queue=max_queue),
        context_length=context_length or context_length_of(model, tokenizer), max_tokens_cap=max_tokens_cap,
        default_max_tokens=default_max_tokens, request_timeout_s=request_timeout_s, patching_default=patching_default)
    served.worker.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.worker.start()  # already running unless the app was shut down before
        yield
        await asyncio.to_thread(served.worker.close)

    app = FastAPI(title="autopatch", summary="OpenAI-compatible chat completions with two-hop patching",
                  version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(_RequestLog)

    @app.get("/health")
    async def health() -> SafeJSONResponse:
        if not served.worker.alive:
            raise ApiError(503, "The generation worker is not running.", type="unavailable_error", code="worker_down")
        return SafeJSONResponse({"status": "ok", "model": served.name, "queue_depth": served.worker.depth,
                                 "max_queue": served.worker.max_queue})

    def model_card() -> dict:
        return ModelCard(id=served.name, created=served.created, owned_by="autopatch",
                         max_model_len=served.context_length).model_dump()

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def get_model(model_id: str) -> dict:
        if model_id != served.name:
            raise _unknown_model(model_id, served.name)
        return model_card()

    @app.post("/v1/chat/completions", response_model=None, responses={
        200: {"model": ChatCompletion, "content": {"text/event-stream": {}},
              "description": "A chat.completion object, or with stream=true an SSE stream of chat.completion.chunk"},
        **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        try:
            job, events = _plan(served, body)
            served.worker.submit(job)
        except ApiError:
            raise
        except Exception:
            logger.exception("could not prepare a request")
            raise internal_error() from None
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        deadline = asyncio.get_running_loop().time() + served.request_timeout_s
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(served, job, events, deadline, request_id, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                kind, payload = await _next_event(events, deadline, job)
                if kind == "done":
                    break
                if kind == "error":
                    raise payload
        finally:
            job.cancelled.set()  # a no-op once done; stops the worker if we left early (timeout, disconnect)
        result: GenerationResult = payload
        _log_completion(request_id, result, stream=False)
        return SafeJSONResponse({
            "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": served.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                         "finish_reason": result.finish_reason}],
            "usage": _usage(result), "system_fingerprint": None, "autopatch": result.report})

    _drop_422_from_openapi(app)
    return app


# ---- planning: everything that can be refused is refused here, before the queue ----------


def _unknown_model(requested: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{requested[:200]}' does not exist; this server serves '{served}'.",
                    type="not_found_error", param="model", code="model_not_found")


def _plan(served: _Served, body: ChatCompletionRequest) -> tuple[GenerationJob, asyncio.Queue]:
    if body.model is not None and body.model != served.name:
        raise _unknown_model(body.model, served.name)
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
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens, but the messages use {n} tokens "
                            "(and the answer needs at least one more). Shorten the messages.",
                       type="context_length_exceeded", param="messages", code="context_length_exceeded")
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
        if not hasattr(gate, "threshold"):
            raise invalid_request(f"autopatch.threshold needs a learned gate with a threshold, but no learned gate is "
                                  f"loaded (this server uses {type(gate).__name__}).", param="autopatch.threshold")
        gate = gate_with_threshold(gate, options.threshold)

    if body.temperature is not None and body.temperature >= SAMPLING_EPS:
        sampling: dict[str, Any] = {"do_sample": True, "temperature": body.temperature}
        if body.top_p is not None:
            sampling["top_p"] = body.top_p
    else:
        sampling = {"do_sample": False}

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event) -> None:  # called on the worker thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = GenerationJob(prompt_ids=list(ids), question=prompt.question, max_new_tokens=max_new, profile=profile,
                        gate=gate, patching=options.enabled if options.enabled is not None else served.patching_default,
                        emit=emit, sampling=sampling, seed=body.seed,
                        stop=[*body.stop_strings(), *prompt.stop], stream=bool(body.stream))
    return job, events


def _token_budget(served: _Served, body: ChatCompletionRequest, prompt_tokens: int) -> int:
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


# ---- waiting for the worker ---------------------------------------------------------------


async def _next_event(events: asyncio.Queue, deadline: float, job: GenerationJob) -> tuple[str, Any]:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(events.get(), remaining)
    except asyncio.TimeoutError:
        job.cancelled.set()
        raise ApiError(504, "The request timed out waiting for the model (queueing plus generation); retry later "
                            "or ask for fewer tokens.", type="timeout_error", code="timeout") from None


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _frame(data: dict) -> str:
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return f"data: {text}\n\n"


async def _sse(served: _Served, job: GenerationJob, events: asyncio.Queue, deadline: float, request_id: str,
               include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": served.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        if include_usage:
            data.setdefault("usage", None)
        return data

    try:
        yield _frame(chunk({"role": "assistant", "content": ""}))
        while True:
            try:
                kind, payload = await _next_event(events, deadline, job)
            except ApiError as err:
                kind, payload = "error", err
            if kind == "delta":
                yield _frame(chunk({"content": payload}))
            elif kind == "error":
                logger.warning("stream %s ended with an error: %s", request_id, payload.message)
                yield _frame(payload.body())
                break
            else:
                result: GenerationResult = payload
                _log_completion(request_id, result, stream=True)
                yield _frame(chunk({}, result.finish_reason, autopatch=result.report))
                if include_usage:
                    yield _frame({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                  "model": served.name, "choices": [], "usage": _usage(result)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client may have gone: stop generating for nobody


def _log_completion(request_id: str, result: GenerationResult, *, stream: bool) -> None:
    logger.info("%s stream=%s patched=%s prompt_tokens=%d completion_tokens=%d finish=%s", request_id, stream,
                result.report.get("patched"), result.prompt_tokens, result.completion_tokens, result.finish_reason)


def _drop_422_from_openapi(app: FastAPI) -> None:
    """Validation errors are answered with 400 (OpenAI's status), so the schema should not promise 422."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
