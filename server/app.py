"""``create_app``: an OpenAI-compatible chat-completions server for one model, patched by autopatch.

Example:
    >>> import autopatch, uvicorn
    >>> from server import create_app
    >>> model, tok = autopatch.load_model()
    >>> app = create_app(model, tok, model_name="gemma-3-270m", max_queue=32, request_timeout_s=120)
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/chat/completions`` (plain JSON or SSE streaming),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``. Requests are
validated, rendered and tokenized on one preparation thread (with the app's own
copy of the tokenizer, :mod:`server.planning`), never on the event loop;
generation runs on the single worker thread of :mod:`server.worker`, which
micro-batches compatible requests. While a request waits, the event loop polls
for its client: a client that disconnects cancels its job. See
``docs/server.md`` for the request extensions, the error table and the
concurrency model.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from transformers import PreTrainedTokenizerBase

from autopatch.gating import Gate
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from server.errors import ApiError, SafeJSONResponse, install_error_handlers, internal_error
from server.guards import RequestGuard
from server.jobs import Event, GenerationJob, GenerationResult, timeout_error
from server.planning import SAMPLING_EPS, Served, context_length_of, gate_with_threshold, plan, unknown_model
from server.schemas import ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelCard, ModelList
from server.worker import BatchWindow, GenerationWorker

logger = logging.getLogger("autopatch.server")

_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 404, 500, 503, 504)}
DISCONNECT_POLL_S = 0.2  # how often a waiting request checks that its client is still connected

__all__ = ["SAMPLING_EPS", "context_length_of", "create_app", "gate_with_threshold"]


class _ClientGone(Exception):
    """The client disconnected while its request waited for the worker."""


class _RequestLog:
    """ASGI middleware: one log line per request with its status and latency (to the last byte sent).

    A response that never ends (the client left mid-stream) is logged too, when the app lets go of it.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, ended = time.perf_counter(), [0], [False]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ended[0] = True
                logger.info("%s %s -> %d in %.1f ms", scope["method"], scope["path"], status[0],
                            (time.perf_counter() - started) * 1000)

        try:
            await self.app(scope, receive, send_logged)
        except (_ClientGone, ClientDisconnect):
            pass  # nothing can be sent to a client that has gone; the line below records it
        finally:
            if not ended[0]:
                logger.info("%s %s -> %d dropped: the client disconnected after %.1f ms", scope["method"],
                            scope["path"], status[0], (time.perf_counter() - started) * 1000)


def create_app(model, tokenizer: PreTrainedTokenizerBase, *, model_name: str, profile: PatchProfile | str | None = None,
               gate: Gate | str | None = None, control: str | None = None, max_queue: int = 32,
               request_timeout_s: float = 120.0, max_tokens_cap: int = 1024, default_max_tokens: int = 256,
               context_length: int | None = None, patching_default: bool = True, api_key: str | None = None,
               max_body_bytes: int = 4 * 2**20, max_prompt_tokens: int | None = 4096, max_batch_size: int = 8,
               batch_window_s: float = 0.01, max_batch_wait_s: float = 0.1, body_timeout_s: float = 30.0) -> FastAPI:
    """An app serving ``model`` as ``model_name``; ``profile``/``gate``/``control`` go to :class:`AutoPatcher`.

    ``max_queue`` requests may wait while a batch generates; more get 503.
    ``request_timeout_s`` bounds preparation, queueing and generation (504 after it).
    ``max_tokens`` may not exceed ``max_tokens_cap`` nor the context left
    after the prompt; when absent it is ``min(default_max_tokens, that)``.
    Prompts over ``max_prompt_tokens`` tokens get 400 (``None``: only the context limits them).
    ``patching_default`` applies when a request does not say ``autopatch.enabled``.
    Greedy requests (streamed or not) arriving within ``batch_window_s`` of each other share one ``generate``
    call, up to ``max_batch_size`` (1 turns batching off; :mod:`server.batching`); a batch smaller than the one
    that just ended, or than the requests still being prepared would make it, waits up to ``max_batch_wait_s`` for
    more (:class:`server.worker.BatchWindow`).
    ``api_key``: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>`` (401 otherwise);
    bodies over ``max_body_bytes`` get 413, and bodies that stall for ``body_timeout_s`` get 408
    (:mod:`server.guards`). The interactive ``/docs`` page is off: it loads its assets from a CDN, which an
    offline machine cannot reach (``/openapi.json`` is served).
    """
    base = AutoPatcher(model, tokenizer, profile, gate, control=control)
    worker = GenerationWorker(model, tokenizer, control=control, max_queue=max_queue, max_batch_size=max_batch_size,
                              window=BatchWindow(gap_s=batch_window_s, max_wait_s=max_batch_wait_s))
    served = Served(
        name=model_name, created=int(time.time()), base=base, tokenizer=copy.deepcopy(tokenizer), worker=worker,
        context_length=context_length or context_length_of(model, tokenizer), max_tokens_cap=max_tokens_cap,
        default_max_tokens=default_max_tokens, request_timeout_s=request_timeout_s, patching_default=patching_default,
        max_prompt_tokens=max_prompt_tokens, prep=ThreadPoolExecutor(1, thread_name_prefix="autopatch-prepare"))
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
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
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
            raise unknown_model(model_id, served.name)
        return model_card()

    @app.post("/v1/chat/completions", response_model=None, responses={
        200: {"model": ChatCompletion, "content": {"text/event-stream": {}},
              "description": "A chat.completion object, or with stream=true an SSE stream of chat.completion.chunk"},
        **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        deadline = time.monotonic() + served.request_timeout_s
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: Event) -> None:  # called on the worker thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            with served.worker.preparing():  # a forming batch holds for this job (server.worker.BatchWindow)
                job = await loop.run_in_executor(served.prep, lambda: plan(served, body, emit, deadline=deadline))
                served.worker.submit(job)
        except ApiError:
            raise
        except Exception:
            logger.exception("could not prepare a request")
            raise internal_error() from None
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(served, job, events, request, request_id, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                kind, payload = await _next_event(events, job, request)
                if kind == "done":
                    break
                if kind == "error":
                    raise payload
        except _ClientGone:
            logger.info("%s: the client disconnected before its answer was ready; cancelled", request_id)
            raise ApiError(499, "The client closed the connection before the answer was ready.",
                           type="client_disconnected", code="client_disconnected") from None
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


# ---- waiting for the worker ---------------------------------------------------------------


async def _next_event(events: asyncio.Queue, job: GenerationJob, request: Request | None = None) -> Event:
    """The job's next event. Past the job's deadline: cancel it and raise 504. Every ``DISCONNECT_POLL_S`` seconds
    of waiting, check the client: when it has gone, cancel the job and raise :class:`_ClientGone`."""
    getter = asyncio.ensure_future(events.get())
    try:
        while True:
            remaining = (job.deadline - time.monotonic()) if job.deadline is not None else DISCONNECT_POLL_S
            if remaining <= 0:
                job.cancelled.set()
                raise timeout_error()
            wait = min(remaining, DISCONNECT_POLL_S) if request is not None else remaining
            done, _ = await asyncio.wait({getter}, timeout=wait)
            if getter in done:
                return getter.result()
            if request is not None and await request.is_disconnected():
                job.cancelled.set()
                raise _ClientGone
    finally:
        if not getter.done():
            getter.cancel()


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


async def _sse(served: Served, job: GenerationJob, events: asyncio.Queue, request: Request, request_id: str,
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
                kind, payload = await _next_event(events, job, request)
            except ApiError as err:
                kind, payload = "error", err
            except _ClientGone:
                logger.info("stream %s: the client disconnected; cancelled", request_id)
                raise  # the response never ends: the request log records it as dropped
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
