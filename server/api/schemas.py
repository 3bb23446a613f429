"""Request bodies of the OpenAI-compatible routes, and the response shapes of every route.

Requests: strict types (no "5" for 5); unknown fields are ignored, as OpenAI clients send fields
this server has no use for. Fields whose non-default value would change the answer in a way this
server cannot honour (``best_of`` other than n, ``suffix``, ``tools``, a ``response_format``
other than text) are refused, with the field as ``param`` and a message of our own (``refuse``);
their JSON schema (``WithJsonSchema``) names the only values accepted, so that the OpenAPI
document says what the validators do.

Responses are built as plain dicts by the handlers; the models at the end of this file only
describe them in the OpenAPI document (``server.api.openapi``), and tests/reliability/
test_schema.py checks every answer against that document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from adapters_store.types import NAME_RE
from adapters_store.validate import AdapterLimits
from server.engine.request import MAX_LOGIT_BIAS, MAX_LOGPROBS

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
NAME_PATTERN = NAME_RE.pattern
MAX_TEXT_CHARS = AdapterLimits.max_text_chars


def refuse(message: str) -> PydanticCustomError:
    """A validation error whose message is ``message`` as it is (a ``ValueError`` would reach
    the client as "Value error, ..."); the handler puts the field's name in front of it."""
    return PydanticCustomError("invalid_value", message)


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
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[
        dict[str, float] | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {
                        "type": "object",
                        "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                        "maxProperties": MAX_LOGIT_BIAS,
                    },
                    {"type": "null"},
                ],
                "description": "token id (a decimal string) -> bias added to its logit",
            }
        ),
    ] = None
    # Extensions.
    top_k: int = Field(0, ge=-1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    adapters: list[str] = Field(default_factory=list, max_length=8)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 16 or any(not s for s in stops):
            raise refuse("at most 16 non-empty strings")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise refuse("only allowed with stream: true")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if not value:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise refuse(f"at most {MAX_LOGIT_BIAS} token ids")
        for token, bias in value.items():
            if not (token.isascii() and token.isdecimal() and len(token) <= 9):
                raise refuse(f"keys are token ids written as decimal strings, not {token!r}")
            if not -100 <= bias <= 100:
                raise refuse(f"the bias of token {token} must be between -100 and 100")
        return value

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
    # 0 only with echo: the prompt scored, nothing generated (OpenAI's legacy scoring call).
    max_tokens: int | None = Field(
        None, ge=0, le=1 << 20, description="0 only with echo: true (score the prompt alone)"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="log probabilities of each token, and top k"
    )
    echo: bool = False
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

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise refuse("must not be empty")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise refuse("only equal to n is supported by this server")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise refuse("not supported by this server")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(
        cls, value: str | list[TextPart] | None, info: ValidationInfo
    ) -> str | list[TextPart] | None:
        # As OpenAI's API: only an assistant turn may come without content.
        role = info.data.get("role")
        if value is None and role is not None and role != "assistant":
            raise refuse(f"required for a {role} message (a string or a list of text parts)")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    tools: Annotated[
        list[Any] | None,
        WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]}),
    ] = None
    tool_choice: Any = None
    response_format: Annotated[
        dict[str, Any] | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "object", "properties": {"type": {"enum": ["text", None]}}},
                    {"type": "null"},
                ]
            }
        ),
    ] = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="only with logprobs: true"
    )

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise refuse("not supported by this server")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type") not in (None, "text"):
            raise refuse('only {"type": "text"} is supported by this server')
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise refuse("only with logprobs: true")
        return value

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
    # Only in an upload's answer, when the version it replaced was of another kind.
    replaced_kind: Literal["prefix_tuning", "prompt_tuning", "p_tuning", "text"] | None = None


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


class CompletionLogprobs(_Shape):
    """OpenAI's legacy shape: one entry per token in each list. ``token_logprobs`` is null for
    the first prompt token (echo); ``top_logprobs`` maps token text to log probability (the k
    most likely, and the chosen token)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(_Shape):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(_Shape):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Shape):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionChoice(_Shape):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
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
    logprobs: ChatLogprobs | None
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
    logprobs: CompletionLogprobs | None
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
    logprobs: ChatLogprobs | None
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
