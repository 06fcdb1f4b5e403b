"""Pydantic models of the OpenAI chat-completions API, as far as this server implements it.

Example:
    >>> from server.schemas import ChatCompletionRequest
    >>> req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}],
    ...                                             "max_tokens": 8, "autopatch": {"enabled": False}})
    >>> req.token_limit(), req.autopatch.enabled
    (8, False)

Requests are validated strictly (``"ten"`` or ``true`` is not an integer), like
OpenAI; unknown top-level fields are kept in ``model_extra`` and ignored, like
vLLM. The ``autopatch`` object is this server's extension (the ``openai``
client sends it with ``extra_body={"autopatch": {...}}``); it rejects unknown
keys, so a typo is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from autopatch.registry import standalone_strategies

Role = Literal["system", "developer", "user", "assistant"]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # a stop string longer than this cannot be an end marker; it only costs the worker time


def _check_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from err
    return value


class TextPart(BaseModel):
    """One ``{"type": "text", "text": ...}`` content part; other part types are not supported."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A chat turn. ``content`` may be a string or a list of text parts (joined with no separator)."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"content parts of type {str(part.get('type'))[:40]!r} are not supported; "
                                     "this server accepts text only")
        return value

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, list):
            for part in value:
                _check_text(part.text)
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


StrategyName = Literal[standalone_strategies()]  # type: ignore[valid-type]  # derived from autopatch.registry


class AutopatchOptions(BaseModel):
    """Per-request patching controls: ``{"enabled": bool, "strategy": ..., "threshold": float}``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    enabled: bool | None = Field(default=None, description="Patch two-hop questions (default: the server's setting).")
    strategy: StrategyName | None = Field(  # type: ignore[valid-type]  # Literal built at runtime from the registry
        default=None, description=f"Override the profile's strategy, one of {standalone_strategies()}.")
    threshold: float | None = Field(default=None, description="Override the learned gate's threshold (needs a learned gate).")


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Fields not listed here are accepted and ignored (and logged)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    n: int | None = Field(default=None, description="Only 1 is supported.", json_schema_extra={"minimum": 1, "maximum": 1})
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    autopatch: AutopatchOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        for s in [value] if isinstance(value, str) else value or []:
            _check_text(s)
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("model")
    @classmethod
    def _model_text(cls, value: str | None) -> str | None:
        return _check_text(value) if value is not None else None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("n must be 1: this server returns exactly one choice per request")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def unsupported_field(self) -> str | None:
        """The first field that asks for output this server cannot give (a client relying on it would silently
        get free text), or ``None``. Sent as null, false, "none", "auto" or ``{"type": "text"}`` they are fine."""
        extra = self.model_extra or {}
        harmless: tuple[Any, ...] = (None, False, 0, [], "none", "auto", {"type": "text"})
        for name in UNSUPPORTED_FIELDS:
            if name in extra and extra[name] not in harmless:
                return name
        return None


# Fields that change what the client expects back; refused with 400 rather than ignored.
UNSUPPORTED_FIELDS = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                      "response_format")


# ---- responses (documented in the OpenAPI schema; built as plain dicts at run time) ----------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    autopatch: dict[str, Any] = Field(description="PatchReport.to_dict() of this request: location, gate score, patched, reason.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
