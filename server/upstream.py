"""Decomposition in front of any OpenAI-compatible server: ``autopatch serve --upstream URL``.

Example:
    >>> from server.upstream import UpstreamDecomposer, create_proxy_app
    >>> client = UpstreamDecomposer("http://localhost:8001", api_key=os.environ.get("UPSTREAM_KEY"))
    >>> client.answer([{"role": "user", "content": "What is the capital of the country where the Colosseum is?"}])
    ('Rome', {'patched': True, 'strategy': 'decompose', 'bridge': 'Italy', ...})
    >>> app = create_proxy_app("http://localhost:8001")     # the same, as a chat endpoint (FastAPI)
    $ autopatch serve --upstream http://localhost:8001/v1 --port 8000

Why it exists: people serve models with vLLM, SGLang, TGI or llama.cpp's server,
and none of them runs Python forward hooks. The route that pays on every
embedded model, ``decompose``, is plain text: locate the first hop, ask it,
fill the bridge into the second hop, ask that. So it runs here, in front of any
chat endpoint, with the very prompts the local ``decompose`` strategy uses (the
short-answer instruction and demonstrations as chat turns: a chat model behind
it sees what the local one sees). Requests the locator cannot read are passed
through unchanged, streamed or not, and their answers come back untouched.

What it cannot do: hidden-state strategies (refused with a 400 that says why).
The two-hop screen reads a model's own prefill, which the upstream does not
expose, so a small embedded model's screen stands in for it
(:mod:`server.screening`, on by default in ``serve --upstream``): a located
request it turns away is passed through unchanged. Failures of the upstream are the client's 502 (refused
connection, 5xx, malformed JSON, a stream cut short) or 504 (no answer within
``timeout_s``), in OpenAI's error shape; the upstream's API key is sent only
upstream and never appears in a response or an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from typing import Any

import httpx

from autopatch.datatypes import RowPlan
from autopatch.locate import Location
from autopatch.plan import locate_question
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from autopatch.stopping import BRIDGE_STOPS
from autopatch.strategies import _bridge_from_answer  # the local decompose's reading of the bridge
from server.errors import ApiError, invalid_request
from server.schemas import ChatCompletionRequest  # at module level: FastAPI reads the route's annotation from here

BRIDGE_TOKENS = next(f.default for f in fields(PatchProfile) if f.name == "max_bridge_tokens")  # the local budget


class UpstreamError(ApiError):
    """The upstream failed; ``status`` is 502 (bad answer) or 504 (no answer in time)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(status, message, type="upstream_error", code=code)


def plan(messages: Sequence[dict[str, Any]]) -> RowPlan:
    """Locate the last user turn (the locator alone, :func:`autopatch.plan.locate_question`: no model is read here)."""
    question = _text(messages[-1].get("content")) if messages and messages[-1].get("role") == "user" else ""
    if not question.strip():
        return RowPlan(question, None, why_not="no final user turn")
    return replace(locate_question(question.strip()), question=question)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


class UpstreamDecomposer:
    """The text decomposition through an OpenAI-compatible chat endpoint (see the module docstring).

    ``base_url`` is the server's root or its ``/v1``; ``api_key`` goes only to the upstream.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 60.0, fmt: PromptFormat | None = None, transport: httpx.BaseTransport | None = None,
                 screen: Any = None):
        root = base_url.rstrip("/")
        self.screen = screen  # a server.screening.LocalScreen, or None: every located request is decomposed
        self.url = (root if root.endswith("/v1") else root + "/v1") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.fmt = fmt or PromptFormat(kind="chat")
        self._secret = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
                                 transport=transport)

    def close(self) -> None:
        self.http.close()

    # ---- one upstream call ----------------------------------------------------------------------

    def _body(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": body.get("model") or self.model} if (body.get("model") or self.model) else dict(body)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streamed chat completion from the upstream, checked to be one."""
        response = self._send(body)
        try:
            data = response.json()
        except ValueError:
            raise UpstreamError(502, "The upstream answered with malformed JSON.", "upstream_bad_response") from None
        if response.status_code >= 400:
            raise _relayed(response.status_code, data, self._secret)
        try:
            str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise UpstreamError(502, "The upstream's answer is not a chat completion (no choices[0].message).",
                                "upstream_bad_response") from None
        return data

    def _send(self, body: dict[str, Any]) -> httpx.Response:
        try:
            return self.http.post(self.url, json=self._body(body))
        except httpx.TimeoutException:
            raise UpstreamError(504, f"The upstream did not answer within {self.timeout_s:g} s.", "upstream_timeout") from None
        except httpx.HTTPError as err:
            raise UpstreamError(502, f"Cannot reach the upstream ({type(err).__name__}).", "upstream_unreachable") from None

    def stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        """The upstream's SSE stream, relayed line by line; a stream cut short ends with an error event."""
        deadline = time.monotonic() + self.timeout_s
        try:
            with self.http.stream("POST", self.url, json=self._body({**body, "stream": True})) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        raise _relayed(response.status_code, response.json(), self._secret)
                    except ValueError:
                        raise UpstreamError(502, "The upstream answered with malformed JSON.",
                                            "upstream_bad_response") from None
                finished = False
                for line in response.iter_lines():
                    if time.monotonic() > deadline:
                        raise UpstreamError(504, f"The upstream's stream ran past {self.timeout_s:g} s.",
                                            "upstream_timeout")
                    if line.strip() == "data: [DONE]":
                        finished = True
                    yield (line + "\n").encode()
                if not finished:
                    raise UpstreamError(502, "The upstream's stream ended before [DONE].", "upstream_stream_cut")
        except httpx.TimeoutException:
            raise UpstreamError(504, f"The upstream did not answer within {self.timeout_s:g} s.", "upstream_timeout") from None
        except httpx.HTTPError as err:
            raise UpstreamError(502, f"The upstream's stream failed ({type(err).__name__}).", "upstream_stream_cut") from None

    # ---- the decomposition ----------------------------------------------------------------------

    def first_hop(self, location: Location, extra: dict[str, Any]) -> str:
        """The bridge: the first hop asked in the short-answer format, its answer's first line."""
        body = {**extra, "messages": self.fmt.chat_messages(location.first_hop(location.subject)), "max_tokens": BRIDGE_TOKENS,
                "stop": list(BRIDGE_STOPS), "stream": False, "temperature": 0}
        return _bridge_from_answer(str(self.complete(body)["choices"][0]["message"]["content"] or ""))

    def second_hop_body(self, body: dict[str, Any], location: Location, bridge: str) -> dict[str, Any]:
        """The request to send for the answer: the second hop with the bridge in its slot, as the local
        ``decompose`` asks it (the span itself when no bridge came back)."""
        return {**body, "messages": self.fmt.chat_messages(location.fill(bridge or location.span))}

    def answer(self, messages: Sequence[dict[str, Any]], *, max_tokens: int = 16) -> tuple[str, dict[str, Any]]:
        """The answer text and a report, for a client using this object directly (greedy)."""
        body = {"messages": list(messages), "max_tokens": max_tokens, "temperature": 0}
        data, report = self.handle(body)
        return str(data["choices"][0]["message"]["content"] or ""), report

    def decide(self, messages: Sequence[dict[str, Any]]) -> tuple[RowPlan, dict[str, Any]]:
        """The request's plan after the screen (a located request the screen turns away has no location), and the
        screen's verdict for the report (empty where no screen ran)."""
        p = plan(messages)
        if p.location is None or self.screen is None:
            return p, {}
        score, passed = self.screen.verdict(messages)
        verdict = {"screen_score": score, "screen_passed": passed}
        if passed:
            return p, verdict
        return replace(p, location=None, why_not=f"screen ({self.screen.name}): P(two-hop question)={score:.3f} < "
                                                 f"{self.screen.screen.threshold:.3f}: left alone"), verdict

    def decomposed(self, body: dict[str, Any], location: Location) -> tuple[dict[str, Any], dict[str, Any]]:
        """The upstream's answer to the decomposed question, and the report."""
        bridge = self.first_hop(location, {k: v for k, v in body.items() if k in ("model",)})
        data = self.complete(self.second_hop_body(body, location, bridge))
        return data, {"patched": True, "strategy": "decompose", "bridge": bridge, "span": location.span,
                      "reason": "located; decomposed through the upstream"}

    def handle(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A non-streamed request: the upstream's completion (passed through, or of the decomposed question)."""
        p, verdict = self.decide(body["messages"])
        if p.location is None:
            return self.complete(body), {"patched": False, "reason": p.why_not, **verdict}
        data, report = self.decomposed(body, p.location)
        return data, {**report, **verdict}


def _relayed(status: int, data: Any, secret: str | None) -> ApiError:
    """An upstream 4xx is the client's error: its message, under the status the upstream gave; a 5xx is a 502.
    The upstream's key is cut out of whatever message it sent."""
    message = data.get("error", {}).get("message") if isinstance(data, dict) and isinstance(data.get("error"), dict) else None
    if message is not None and secret:
        message = str(message).replace(secret, "[upstream key]")
    if status >= 500:
        return UpstreamError(502, f"The upstream failed with HTTP {status}" + (f": {message}" if message else "."),
                             "upstream_error")
    return ApiError(status, str(message or f"The upstream refused the request (HTTP {status})."),
                    type="invalid_request_error", code="upstream_refused")


# ---- the app --------------------------------------------------------------------------------------


def create_proxy_app(upstream_url: str, *, api_key: str | None = None, upstream_api_key: str | None = None,
                     upstream_model: str | None = None, timeout_s: float = 60.0, max_body_bytes: int = 4 * 2**20,
                     fmt: PromptFormat | None = None, transport: httpx.BaseTransport | None = None, screen: Any = None):
    """A FastAPI chat endpoint that decomposes through ``upstream_url`` (see the module docstring).

    ``fmt``: how the hops are asked (default: the chat format with the short-answer instruction and demonstrations,
    as the embedded instruct models' ``decompose`` profiles ask them). ``screen``: a
    :class:`server.screening.LocalScreen` that located requests must pass (``None``: all are decomposed).
    """
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    from server.errors import install_error_handlers
    from server.guards import RequestGuard

    client = UpstreamDecomposer(upstream_url, api_key=upstream_api_key, model=upstream_model, timeout_s=timeout_s,
                                fmt=fmt, transport=transport, screen=screen)
    app = FastAPI(title="autopatch (decomposition in front of an OpenAI-compatible server)")
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.state.upstream = client

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest):
        options = request.autopatch
        if options is not None and options.strategy not in (None, "decompose"):
            raise invalid_request(f"Strategy {options.strategy!r} patches the model's hidden states, which a remote "
                                  "upstream does not expose; in front of an upstream only 'decompose' (text) runs. "
                                  "Serve the model locally (autopatch serve --model ...) for hidden-state strategies.",
                                  param="autopatch.strategy")
        body = request.model_dump(exclude_none=True, exclude={"autopatch"})
        body["messages"] = [{"role": m["role"], "content": _text(m.get("content"))} for m in body["messages"]]
        enabled = options is None or options.enabled is not False
        p, verdict = (await run_in_threadpool(client.decide, body["messages"]) if enabled
                      else (RowPlan("", None, why_not="patching disabled by the request"), {}))
        if not request.stream:
            if p.location is None:
                data = await run_in_threadpool(client.complete, body)
                return JSONResponse(data)
            data, report = await run_in_threadpool(client.decomposed, body, p.location)
            return JSONResponse({**data, "autopatch": {**report, **verdict}})
        if p.location is not None:  # the first hop is asked first; the answer is the upstream's own stream
            bridge = await run_in_threadpool(client.first_hop, p.location, {k: v for k, v in body.items() if k == "model"})
            body = client.second_hop_body(body, p.location, bridge)
        lines = client.stream(body)
        first = await run_in_threadpool(next, lines, None)  # a failure before the first byte is still a 502/504
        return StreamingResponse(_relay(first, lines), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        name = upstream_model or "upstream"
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "autopatch-proxy"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "upstream": client.url.rsplit("/v1", 1)[0]}

    return app


def _relay(first: bytes | None, lines: Iterator[bytes]) -> Iterator[bytes]:
    """The upstream's stream; once the headers are sent an upstream failure can only be an error event."""
    try:
        if first is not None:
            yield first
        yield from lines
    except ApiError as err:
        yield f"data: {json.dumps(err.body())}\n\n".encode()
        yield b"data: [DONE]\n\n"


