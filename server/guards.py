"""Request guards in front of the app: an optional API key and a request-body size limit.

Example:
    >>> app = create_app(model, tok, model_name="m", api_key="s3cret", max_body_bytes=1 << 20)
    >>> # curl -H "Authorization: Bearer s3cret" ...   (``/health`` stays open for probes)

Both answer in OpenAI's error shape before the request reaches FastAPI, so a
refused request costs no parsing: ``401 invalid_api_key`` (the key is compared
in constant time with :func:`hmac.compare_digest`) and ``413
request_too_large`` (from ``Content-Length``, or counted while a chunked body
arrives: the body is read here, at most the limit, and handed on whole).
A body that stops arriving for ``body_timeout_s`` seconds gets ``408
request_timeout``, so a half-sent request cannot hold a connection forever.
"""

from __future__ import annotations

import asyncio
import hmac
import json

OPEN_PATHS = ("/health",)


def _error(status: int, message: str, code: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body.encode()


class RequestGuard:
    """ASGI middleware: ``api_key`` (``None``: no key) on every path but :data:`OPEN_PATHS`; bodies over
    ``max_body_bytes`` get 413; a body that stalls for ``body_timeout_s`` seconds gets 408."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, body_timeout_s: float = 30.0):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") not in OPEN_PATHS and not self._authorised(headers):
            return await self._send(send, 401, "Invalid or missing API key: send the header "
                                    "'Authorization: Bearer <key>' with the key the server was started with.",
                                    "invalid_api_key")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._send(send, 413, self._too_large(), "request_too_large")
        chunks, size = [], 0
        while True:  # read the body here (at most the limit), so an oversized one never reaches the app
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                return await self._send(send, 408, f"The request body stalled: nothing arrived for "
                                        f"{self.body_timeout_s:g} seconds (autopatch serve --body-timeout).",
                                        "request_timeout")
            if message["type"] != "http.request":
                return  # the client left before its body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._send(send, 413, self._too_large(), "request_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as before

        await self.app(scope, replay, send)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"").decode("latin-1")
        token = value[7:].strip() if value[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode("utf-8", "replace"), str(self.api_key).encode("utf-8"))

    def _too_large(self) -> str:
        return (f"The request body is over the server's limit of {self.max_body_bytes} bytes "
                "(autopatch serve --max-body-bytes).")

    @staticmethod
    async def _send(send, status: int, message: str, code: str) -> None:
        start, body = _error(status, message, code)
        await send(start)
        await send({"type": "http.response.body", "body": body})
