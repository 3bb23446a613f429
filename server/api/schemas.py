"""Request bodies of the OpenAI-compatible routes, and the response shapes of every route.

Requests: strict types (no "5" for 5); unknown fields are ignored, as OpenAI clients send fields
this server has no use for. Fields whose non-default value would change the answer in a way this
server cannot honour (``logprobs``, ``echo``, ``best_of`` > n, ``suffix``, tools) are refused;
their JSON schema (``WithJsonSchema``) names the only values accepted, so that the OpenAPI
document says what the validators do.

Responses are built as plain dicts by the handlers; the models at the end of this file only
describe them in the OpenAPI document (``server.api.openapi``), and tests/reliability/
test_schema.py checks every answer against that document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from adapters_store.types import NAME_RE
from adapters_store.validate import AdapterLimits

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
NAME_PATTERN = NAME_RE.pattern
MAX_TEXT_CHARS = AdapterLimits.max_text_chars


def _only(*values: Any, description: str) -> WithJsonSchema:
    return WithJsonSchema({"enum": list(values), "description": description})


_NONEMPTY = {"type": "string", "minLength": 1}
_TOKEN_ID = {"type": "integer", "minimum": 0, "description": "below the vocabulary size"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Generation(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={
            # What JSON Schema cannot say (answered 400), and the one rule it can (if/then).
            "description": "Integers are written as integers (5, not 5.0 nor '5'); "
            "min_tokens at most the token limit; best_of only equal to n; prompts x n at most "
            "64; the prompt and the token limit within the model's context; stream_options "
            "only with stream: true.",
            "if": {
                "properties": {"stream_options": {"type": "object"}},
                "required": ["stream_options"],
            },
            "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
        },
    )

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Annotated[
        str | list[str] | None,
        WithJsonSchema(
            {
                "anyOf": [
                    _NONEMPTY,
                    {"type": "array", "items": _NONEMPTY, "maxItems": 16},
                    {"type": "null"},
                ]
            }
        ),
    ] = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Extensions.
    top_k: int = Field(0, ge=-1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    adapters: list[str] = Field(default_factory=list, max_length=8)
    # Refused when set to anything but their defaults.
    logprobs: Annotated[Any, _only(None, False, 0, description="not supported")] = None
    frequency_penalty: Annotated[float | None, _only(None, 0, description="not supported")] = None
    presence_penalty: Annotated[float | None, _only(None, 0, description="not supported")] = None
    logit_bias: Annotated[
        dict | None,
        WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]}),
    ] = None

    @model_validator(mode="after")
    def _supported(self) -> _Generation:
        stops = self.stops
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop: at most 16 non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        refused = {
            "logprobs": self.logprobs not in (None, False, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "presence_penalty": self.presence_penalty not in (None, 0),
            "logit_bias": bool(self.logit_bias),
        }
        for name, bad in refused.items():
            if bad:
                raise ValueError(f"{name} is not supported by this server")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    prompt: Annotated[
        str | list[str] | list[int] | list[list[int]],
        WithJsonSchema(
            {
                "anyOf": [
                    _NONEMPTY,
                    {"type": "array", "items": _NONEMPTY, "minItems": 1},
                    {"type": "array", "items": _TOKEN_ID, "minItems": 1},
                    {
                        "type": "array",
                        "items": {"type": "array", "items": _TOKEN_ID, "minItems": 1},
                        "minItems": 1,
                    },
                ],
                "description": "text or token ids; one prompt or a list of them",
            }
        ),
    ]
    echo: Annotated[bool, _only(False, description="not supported")] = False
    best_of: Annotated[
        int | None,
        WithJsonSchema(
            {"type": ["integer", "null"], "description": "only equal to n is supported"}
        ),
    ] = None
    suffix: Annotated[
        str | None,
        WithJsonSchema({"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}]}),
    ] = None

    @model_validator(mode="after")
    def _completion_only(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    tools: Annotated[
        list | None,
        WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]}),
    ] = None
    tool_choice: Any = None
    response_format: Annotated[
        dict | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "object", "properties": {"type": {"enum": ["text", None]}}},
                    {"type": "null"},
                ]
            }
        ),
    ] = None

    @model_validator(mode="after")
    def _chat_only(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported by this server")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TextAdapterBody(BaseModel):
    """``POST /v1/adapters`` with a JSON body: a named text prefix."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, WithJsonSchema({"type": "string", "pattern": NAME_PATTERN})]
    text: Annotated[
        str, WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS})
    ]


# Responses (documentation only: the handlers build these shapes as dicts).


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Shape):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Shape):
    """Every 4xx and 503 of the API, and an error event inside a stream."""

    error: ErrorDetail


class Adapter(_Shape):
    id: str
    object: Literal["adapter"]
    name: Annotated[str, WithJsonSchema({"type": "string", "pattern": NAME_PATTERN})]
    kind: Literal["prefix_tuning", "prompt_tuning", "p_tuning", "text"]
    num_virtual_tokens: int = Field(ge=0)
    version: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    created: int
    owned_by: str


class AdapterList(_Shape):
    object: Literal["list"]
    data: list[Adapter]


class AdapterDeleted(_Shape):
    id: str
    object: Literal["adapter"]
    deleted: Literal[True]


class Model(_Shape):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None


class ModelList(_Shape):
    object: Literal["list"]
    data: list[Model] = Field(min_length=1)


class PromptTokensDetails(_Shape):
    cached_tokens: int = Field(ge=0)


class Usage(_Shape):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails


FinishReason = Literal["stop", "length", "abort"]


class CompletionChoice(_Shape):
    index: int = Field(ge=0)
    text: str
    logprobs: None
    finish_reason: FinishReason


class Completion(_Shape):
    id: str = Field(pattern=r"^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice] = Field(min_length=1)
    usage: Usage


class AssistantMessage(_Shape):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Shape):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(_Shape):
    id: str = Field(pattern=r"^chatcmpl-")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice] = Field(min_length=1)
    usage: Usage


class CompletionChunkChoice(_Shape):
    index: int = Field(ge=0)
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class CompletionChunk(_Shape):
    """One event of a ``/v1/completions`` stream; ``usage`` only with ``include_usage`` (null
    but in the last event, which has no choices)."""

    id: str = Field(pattern=r"^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice] = Field(max_length=1)
    usage: Usage | None = None


class ChatDelta(_Shape):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class ChatChunkChoice(_Shape):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Shape):
    """One event of a ``/v1/chat/completions`` stream (``usage`` as in ``CompletionChunk``)."""

    id: str = Field(pattern=r"^chatcmpl-")
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(max_length=1)
    usage: Usage | None = None


class Health(_Shape):
    status: Literal["ok", "dead"]


class Ready(_Shape):
    status: Literal["ready"]


class NotReady(_Shape):
    status: Literal["not ready"]
    reason: str


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TextAdapterBody)
RESPONSE_MODELS = (
    ErrorResponse,
    Adapter,
    AdapterList,
    AdapterDeleted,
    ModelList,
    Completion,
    ChatCompletion,
    CompletionChunk,
    ChatCompletionChunk,
    Health,
    Ready,
    NotReady,
)
