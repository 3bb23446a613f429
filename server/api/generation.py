"""``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` (OpenAI's shapes)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from adapters_store.types import AdapterNotFound, InvalidName
from server.api import degraded, streaming
from server.api.context import AppContext, Caller, context
from server.api.errors import APIError, not_found
from server.api.jobs import ClientGone, Job, usage
from server.api.json_body import read_json
from server.api.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs, merge
from server.api.prompt_limits import PromptLimits, check_text_bytes, prompt_limits
from server.api.schemas import ChatCompletionRequest, CompletionRequest, _Generation
from server.config import Principal
from server.engine.request import AdapterSegment, RequestOutput, SamplingParams
from server.engine_client import EngineInput
from server.served_model import ServedModel

router = APIRouter()
MAX_CHOICES = 64  # prompts x n of one request
MAX_MESSAGES = 1024  # ChatCompletionRequest.messages' own limit
MAX_CONTENT_PARTS = 4096  # chat content parts of one request, all messages together
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
G = TypeVar("G", bound=_Generation)


@router.get("/v1/models")
async def models(request: Request, who: Caller) -> dict[str, Any]:
    ctx = context(request)
    base = ctx.model().facts.model_id
    data = [_model(base, ctx.started, "prefix-serve", None)]
    records = await degraded.list_records(ctx, request, who.tenant)
    data += [_model(r.name, r.created, r.tenant, base) for r in records]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id}")
async def model(model_id: str, request: Request, who: Caller) -> dict[str, Any]:
    """One entry of ``/v1/models``: the base model, or one of the caller's adapters (a
    pinned ``name@N`` too); 404 ``model_not_found`` otherwise."""
    ctx = context(request)
    base = ctx.model().facts.model_id
    if model_id == base:
        return _model(base, ctx.started, "prefix-serve", None)
    try:
        record = await ctx.run_store(ctx.store.get, who.tenant, model_id)
    except (AdapterNotFound, InvalidName):
        raise not_found("model", model_id, "model") from None
    return _model(model_id, record.created, record.tenant, base)


def _model(model_id: str, created: int, owner: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owner,
        "parent": parent,
    }


@router.post("/v1/completions")
async def completions(request: Request, who: Caller) -> Response:
    body, ctx, model, limits, segments = await _prepare(request, who, CompletionRequest)
    if body.max_tokens == 0 and (not body.echo or body.min_tokens):
        raise APIError(
            400,
            "max_tokens 0 scores the prompt without generating: only with echo: true (and "
            "min_tokens 0)",
            code="invalid_request",
            param="max_tokens",
        )
    prompts = await _completion_prompts(ctx, body.prompt, model.tokenizer, limits)
    limit = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    if body.echo:
        texts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not isinstance(texts[0], str):  # token ids: their text is what is echoed
            texts = await ctx.run_cpu(_decode, model.tokenizer, prompts)
        echo = Echo(texts, prompts)
    else:
        echo = None
    return await _generate(ctx, request, body, who, segments, prompts, limit, chat=False, echo=echo)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, who: Caller) -> Response:
    body, ctx, model, limits, segments = await _prepare(request, who, ChatCompletionRequest)
    prompt = await _chat_prompt(ctx, body, model.tokenizer, limits)
    limit = body.token_limit
    if limit is None:  # as much as the context leaves
        used = sum(s.length for s in segments) + len(prompt)
        limit = max(1, limits.context - used)
    return await _generate(ctx, request, body, who, segments, [prompt], limit, chat=True)


async def _prepare(
    request: Request, who: Principal, model: type[G]
) -> tuple[G, AppContext, ServedModel, PromptLimits, list[AdapterSegment]]:
    """The parts both generation routes start with, in order: the body parsed (after auth),
    the loaded model (or 503), the body validated against the model's limits, a cheap 429
    before any costly work, the caller's adapters."""
    ctx = context(request)
    data = await read_json(ctx.json_lane, await _raw_body(request), who.tenant)
    served = ctx.model()
    limits = await _prompt_limits(ctx, served)
    body = _validate(model, data, limits)
    ctx.engine.check_admission(body.n, who.tenant)
    base_id = served.facts.model_id
    resolved = await ctx.resolver.resolve(who.tenant, body.model, base_id, body.adapters)
    if resolved.stale:
        degraded.mark_stale(request)
    return body, ctx, served, limits, resolved.segments


async def _raw_body(request: Request) -> bytes:
    """The body's bytes, read once the caller is authenticated (as a FastAPI body parameter
    it was parsed first: a malformed body without a key answered 400, not 401)."""
    media = request.headers.get("content-type") or "application/json"
    media = media.split(";")[0].strip().lower()
    if not (
        media == "application/json" or media.startswith("application/") and media.endswith("+json")
    ):
        raise APIError(
            400, f"the body must be application/json, not {media!r}", code="invalid_request"
        )
    return await request.body()


def _validate(model: type[G], data: Any, limits: PromptLimits) -> G:
    """``data`` as ``model``, after refusing the lists whose validation alone would hold the
    event loop for a second (pydantic spends microseconds on each item of a token-id list or
    each content part, and 8 MiB holds millions): none of them could be served anyway."""
    if isinstance(data, dict):
        if model is CompletionRequest:
            _check_prompt_lists(data.get("prompt"), limits)
        elif model is ChatCompletionRequest:
            _check_content_parts(data.get("messages"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # answered like FastAPI's own validation errors
        raise RequestValidationError(exc.errors()) from None


def _check_prompt_lists(prompt: Any, limits: PromptLimits) -> None:
    if not isinstance(prompt, list) or not prompt:
        return
    if isinstance(prompt[0], int):
        if len(prompt) > limits.context:
            raise APIError(
                400,
                f"the prompt is {len(prompt)} token ids; at most {limits.context} fit the context",
                code="invalid_request",
                param="prompt",
            )
        return
    if len(prompt) > MAX_CHOICES:
        raise APIError(
            400,
            f"the request has {len(prompt)} prompts; at most {MAX_CHOICES}",
            code="invalid_request",
            param="prompt",
        )
    for i, ids in enumerate(prompt):
        if isinstance(ids, list) and len(ids) > limits.context:
            raise APIError(
                400,
                f"prompt {i} is {len(ids)} token ids; at most {limits.context} fit the context",
                code="invalid_request",
                param="prompt",
            )


def _check_content_parts(messages: Any) -> None:
    if not isinstance(messages, list):
        return
    parts = sum(
        len(m["content"])
        for m in messages[:MAX_MESSAGES]
        if isinstance(m, dict) and isinstance(m.get("content"), list)
    )
    if parts > MAX_CONTENT_PARTS:
        raise APIError(
            400,
            f"the messages have {parts} content parts; at most {MAX_CONTENT_PARTS}",
            code="invalid_request",
            param="messages",
        )


async def _generate(
    ctx: AppContext,
    request: Request,
    body: _Generation,
    who: Principal,
    segments: list[AdapterSegment],
    prompts: list[list[int]],
    max_tokens: int,
    chat: bool,
    echo: Echo | None = None,
) -> Response:
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"prompts x n must be at most {MAX_CHOICES}", param="n")
    context = ctx.model().facts.max_model_len
    before = sum(s.length for s in segments)  # adapters' positions, in front of each prompt
    for i, ids in enumerate(prompts):
        if before + len(ids) >= context:  # no room left for a single generated token
            what = (
                "the messages" if chat else ("the prompt" if len(prompts) == 1 else f"prompt {i}")
            )
            raise APIError(
                400,
                f"{what} take{'' if chat else 's'} {before + len(ids)} positions (adapters "
                f"included): no room is left in the context of {context} for a token",
                code="invalid_request",
                param="messages" if chat else "prompt",
            )
    meta = _Meta(body, chat, echo, prompt_only=max_tokens == 0)
    # Scoring the prompt alone still draws one token (from the prompt's last logits, no decode
    # step): the engine's requests generate at least one; the answer leaves it out.
    engine_limit = max(max_tokens, 1)
    inputs = [
        EngineInput(ids, _params(body, engine_limit, choice, meta), segments, who.tenant)
        for ids in prompts
        for choice in range(body.n)
    ]
    job = Job(ctx.engine, inputs, ctx.config.request_timeout, ctx.metrics)
    request.state.job = job  # read by the request log line
    request.state.adapter_ids = tuple(s.key[:16] for s in segments)
    request.state.stream = bool(body.stream)
    job.watch(request)
    try:
        if body.stream:
            # Wait for the first token so that a request the engine refuses still gets its
            # status code; then stream.
            first = await job.first()
            texts = TokenTexts(ctx.model().tokenizer)
            gen = streaming.events(job, first, meta, body.n, body.stops, body.include_usage, texts)
            return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)
        finals = await job.results()
    except ClientGone:  # nobody is listening; nginx's "client closed request"
        return Response(status_code=499)
    tokenizer = ctx.model().tokenizer
    return JSONResponse(await ctx.run_cpu(_response, meta, finals, body.n, tokenizer))


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Echo:
    """``echo: true``: each prompt's text, sent before its completion, and its token ids."""

    texts: list[str]
    ids: list[list[int]]


class _Meta:
    """Fields shared by every chunk of one response, and how its choices are written:
    ``logprobs`` is the number of top log probabilities per token (None: no logprobs),
    ``echo`` the prompts to echo (None: none), ``prompt_only`` whether the choices show no
    generated token (``max_tokens: 0`` with echo)."""

    def __init__(
        self, body: _Generation, chat: bool, echo: Echo | None = None, prompt_only: bool = False
    ) -> None:
        self.chat = chat
        self.prompt_only = prompt_only
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.model = body.model
        self.echo = echo
        self.logprobs: int | None = None
        if isinstance(body, ChatCompletionRequest):
            self.logprobs = (body.top_logprobs or 0) if body.logprobs else None
        elif isinstance(body, CompletionRequest):
            self.logprobs = body.logprobs

    def shown(self, out: RequestOutput) -> RequestOutput:
        """``out`` as the answer shows it: without its generated token where the request
        scores its prompt alone (finished for the token limit of 0, as OpenAI answers)."""
        if not self.prompt_only:
            return out
        reason = out.finish_reason
        if out.finished and reason in ("stop", "length"):
            reason = "length"
        logprobs = None if out.logprobs is None else out.logprobs[:0]
        return replace(out, token_ids=[], text="", logprobs=logprobs, finish_reason=reason)

    def completion_logprobs(self, texts: TokenTexts) -> CompletionLogprobs | None:
        """A choice's legacy logprobs, to be built part by part (None: not asked for)."""
        return None if self.logprobs is None else CompletionLogprobs(texts, self.logprobs)

    def echo_part(
        self, shape: CompletionLogprobs | None, out: RequestOutput, prompt: int
    ) -> tuple[str, dict[str, Any] | None]:
        """The echoed prompt's text and, with logprobs (``shape``), its part of them: its
        tokens are the last of ``out``'s prompt positions (adapters' tokens come before)."""
        assert self.echo is not None
        text, ids = self.echo.texts[prompt], self.echo.ids[prompt]
        if shape is None:
            return text, None
        scored = out.prompt_logprobs or []
        entries = scored[len(scored) - len(ids) :] if scored else [None] * len(ids)
        part = shape.part(entries, ids, first_null=True)
        shape.offset = len(text)  # generated tokens start after the echoed text
        return text, part


def _params(body: _Generation, max_tokens: int, choice: int, meta: _Meta) -> SamplingParams:
    seed = body.seed if body.seed is None else (body.seed + choice) % 2**64
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=seed,
        stop=body.stops,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        # Keys that are the same id ("7", "07") merge as in a dict, as before.
        logit_bias=tuple({int(t): b for t, b in (body.logit_bias or {}).items()}.items()),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logprobs=meta.logprobs,
        prompt_logprobs=meta.logprobs if meta.echo is not None else None,
    )


# Prompt limits ------------------------------------------------------------------------------
async def _prompt_limits(ctx: AppContext, model: ServedModel) -> PromptLimits:
    """The loaded model's limits, computed once, in the worker pool, at its first request."""
    if ctx.prompt_limits is None:
        ctx.prompt_limits = await ctx.run_cpu(prompt_limits, model)
    return ctx.prompt_limits


# Tokens ---------------------------------------------------------------------------------------
async def _completion_prompts(
    ctx: AppContext, prompt: Any, tokenizer: Any, limits: PromptLimits
) -> list[list[int]]:
    """Token ids of each prompt; text is tokenized in the worker pool, and only once its
    size shows it may fit the context."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    texts = [p for p in prompt if isinstance(p, str)]
    check_text_bytes(texts, limits, "prompt")
    encoded = iter(await ctx.run_cpu(_encode, tokenizer, texts) if texts else ())
    out = []
    for p in prompt:
        ids = next(encoded) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "the prompt is empty", code="invalid_request", param="prompt")
        out.append(ids)
    return out


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Runs in the worker pool: plain lists of ints (no tensors: no torch in this thread)."""
    return [tokenizer.encode(text, add_special_tokens=True) for text in texts]


async def _chat_prompt(
    ctx: AppContext, body: ChatCompletionRequest, tokenizer: Any, limits: PromptLimits
) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    check_text_bytes([m["content"] for m in messages], limits, "messages")
    return await ctx.run_cpu(_apply_template, tokenizer, messages)


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Runs in the worker pool: jinja, then the tokenizer; ``return_dict`` without
    ``return_tensors`` gives lists, never tensors."""
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    except Exception as exc:  # jinja2 errors raised by the template itself
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
    return list(ids)


def _decode(tokenizer: Any, prompts: list[list[int]]) -> list[str]:
    """Runs in the worker pool: the text of token-id prompts (echo)."""
    return [tokenizer.decode(ids) for ids in prompts]


def _response(meta: _Meta, finals: list[RequestOutput], n: int, tokenizer: Any) -> dict[str, Any]:
    """Runs in the worker pool (logprobs decode token texts)."""
    texts = TokenTexts(tokenizer)
    choices = []
    finals = [meta.shown(out) for out in finals]
    for i, out in enumerate(finals):
        choice: dict[str, Any] = {"index": i, "finish_reason": out.finish_reason}
        if meta.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
            choice["logprobs"] = None
            if meta.logprobs is not None:
                choice["logprobs"] = chat_logprobs(texts, out.logprobs or [], meta.logprobs)
        else:
            choice["text"] = out.text
            choice["logprobs"] = None
            shape = meta.completion_logprobs(texts)
            parts = []
            if meta.echo is not None:
                echoed, part = meta.echo_part(shape, out, i // n)
                choice["text"] = echoed + out.text
                parts += [part] if part is not None else []
            if shape is not None:
                entries = out.logprobs or []
                parts.append(shape.part(entries, [e.token for e in entries], first_null=False))
                choice["logprobs"] = merge(parts)
        choices.append(choice)
    return {
        "id": meta.id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(finals, n),
    }
