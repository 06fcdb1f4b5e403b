"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

Example:
    >>> from server.errors import ApiError, invalid_request
    >>> raise invalid_request("n must be 1", param="n")           # -> HTTP 400
    >>> ApiError(404, "No such model", type="not_found_error", code="model_not_found").body()
    {'error': {'message': 'No such model', 'type': 'not_found_error', 'param': None, 'code': 'model_not_found'}}

Every error the server returns goes through :class:`ApiError`, including
FastAPI's validation errors (turned into 400s, like OpenAI, instead of 422s)
and Starlette's 404/405s. Unexpected exceptions become a 500 with a generic
message; the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("autopatch.server")

INTERNAL_ERROR_MESSAGE = "The server hit an internal error while handling this request; the details are in the server log."


class SafeJSONResponse(JSONResponse):
    """A JSON response that survives lone surrogates echoed from the request (escaped instead of a 500)."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        except (UnicodeEncodeError, ValueError):
            return json.dumps(content, ensure_ascii=True, separators=(",", ":"), default=str).encode("ascii")


class ApiError(Exception):
    """An error to send to the client as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})  # e.g. Retry-After on 503

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return SafeJSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def invalid_request(message: str, *, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)


def internal_error() -> ApiError:
    return ApiError(500, INTERNAL_ERROR_MESSAGE, type="server_error", code="internal_error")


def _param_path(loc: tuple) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"`` (OpenAI's spelling)."""
    parts = [p for p in loc if p != "body"]
    # pydantic names union branches in the location ("str", "list[...]"); they are not request fields
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float", "bool"}))]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first validation problem of a request body, as a 400."""
    errors = list(exc.errors())
    if not errors:
        return invalid_request("The request body is invalid.")
    first = errors[0]
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        at = f" at position {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return invalid_request(f"The request body is not valid JSON ({detail or 'decode error'}{at}).", code="json_invalid")
    param = _param_path(loc)
    if kind == "missing" and param is None:
        return invalid_request("The request needs a JSON object body.", code="missing_body")
    if kind == "missing":
        return invalid_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if kind == "model_attributes_type" and param is None:
        return _not_an_object(first.get("input"))
    code = "invalid_type" if kind.endswith("_type") or kind in {"model_type", "model_attributes_type"} else "invalid_value"
    return invalid_request(f"Invalid value for '{param}': {message}" if param else message, param=param, code=code)


def _not_an_object(body: Any) -> ApiError:
    """A body that is not a JSON object. Sent without ``Content-Type: application/json`` (``curl -d``), FastAPI
    hands it over as bytes: malformed JSON is still ``json_invalid``, and an object gets told to set the header."""
    if isinstance(body, (bytes, str)):
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, ValueError) as err:
            return invalid_request(f"The request body is not valid JSON ({str(err)[:200]}).", code="json_invalid")
        if isinstance(value, dict):
            return invalid_request("The request body is a JSON object but was not sent as JSON: send it with the "
                                   "header 'Content-Type: application/json'.", code="invalid_type")
    return invalid_request("The request body must be a JSON object.", code="invalid_type")


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through :class:`ApiError` so clients always see OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found_error", 405: "invalid_request_error", 503: "unavailable_error"}
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route {request.method} {request.url.path}; see /docs for the endpoints."
        status = exc.status_code if 400 <= exc.status_code < 600 else 400
        kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
        return ApiError(status, message, type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return internal_error().response()
