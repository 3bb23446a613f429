"""Plain data exchanged by the engine's parts: sampling parameters, sequences, outputs."""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plain data: the scheduler and its tests run without torch
    import torch

    from server.engine.detokenizer import IncrementalText


class InvalidRequest(ValueError):
    """A request the engine cannot run; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    # Logit adjustments, applied in this order before temperature, top-k and top-p (and before
    # the greedy argmax): logit_bias, repetition_penalty, then the frequency and presence
    # penalties (sampler.adjust_logits). Logprobs are never adjusted: they are the model's.
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), a mapping also accepted
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token is in the output
    frequency_penalty: float = 0.0  # OpenAI's: minus this per occurrence in the output
    repetition_penalty: float = 1.0  # CTRL/HF's, over prompt and output tokens; 0.01..100, 1 off
    logprobs: int | None = None  # top log probabilities per generated token (0..20), or none
    prompt_logprobs: int | None = None  # the same for every prompt token (echo), or none

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in pairs))
        checks = [
            (self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1"),
            (
                math.isfinite(self.temperature) and 0 <= self.temperature <= 100,
                "temperature",
                "temperature must be between 0 and 100",
            ),
            (0 < self.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "top_k must be -1, 0 (off) or positive"),
            (self.min_tokens >= 0, "min_tokens", "min_tokens must be >= 0"),
            (
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                "min_tokens must not exceed max_tokens",
            ),
            (all(s for s in self.stop), "stop", "stop strings must not be empty"),
            (len(self.stop) <= 16, "stop", "at most 16 stop strings"),
            (
                all(t >= 0 for t in self.stop_token_ids),
                "stop_token_ids",
                "stop_token_ids must be token ids (>= 0)",
            ),
            (
                len(self.logit_bias) <= MAX_LOGIT_BIAS
                and all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
                "logit_bias",
                f"logit_bias maps at most {MAX_LOGIT_BIAS} token ids (>= 0) to biases "
                "between -100 and 100",
            ),
            (
                _within(self.presence_penalty, 2),
                "presence_penalty",
                "presence_penalty must be between -2 and 2",
            ),
            (
                _within(self.frequency_penalty, 2),
                "frequency_penalty",
                "frequency_penalty must be between -2 and 2",
            ),
            (
                0.01 <= self.repetition_penalty <= 100,  # beyond, logits overflow to inf
                "repetition_penalty",
                "repetition_penalty must be between 0.01 and 100; 1 is off",
            ),
            (_top(self.logprobs), "logprobs", f"logprobs must be between 0 and {MAX_LOGPROBS}"),
            (
                _top(self.prompt_logprobs),
                "prompt_logprobs",
                f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequest(message, param)

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logit adjustment (bias, penalties) is on."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


MAX_LOGPROBS = 20  # OpenAI's bound on top log probabilities per token
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias


def _within(value: float, bound: float) -> bool:
    return math.isfinite(value) and -bound <= value <= bound


def _top(k: int | None) -> bool:
    return k is None or 0 <= k <= MAX_LOGPROBS


@dataclass(frozen=True, eq=False)
class AdapterSegment:
    """A loaded adapter as the engine sees it: a stretch of virtual tokens or of token ids.

    ``key`` is the adapter's content hash: it names the virtual tokens in the prefix tree, so a
    new version of an adapter is a new key and never reuses stale KV.
    """

    key: str
    kind: str  # prefix_tuning | prompt_tuning | p_tuning | text
    length: int
    kv: torch.Tensor | None = None  # prefix_tuning: [L, 2, Hkv, P, D]
    embeddings: torch.Tensor | None = None  # prompt/p-tuning: [P, hidden]
    token_ids: tuple[int, ...] = ()  # text


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request inside the engine.

    ``key`` is the full token key: one entry per position, an ``int`` token id or a
    ``(adapter_key, i)`` tuple for virtual token ``i`` of an adapter. Generated tokens are
    appended to it. ``virtual`` lists the (start, end, segment) ranges of virtual tokens.
    Invariant: ``num_computed <= len(key)``; positions ``< num_computed`` have KV in the
    blocks of ``block_table`` (``block_table[p // block_size]``).
    """

    request_id: str
    tenant: str
    key: list[Hashable]
    virtual: list[tuple[int, int, AdapterSegment]]
    params: SamplingParams
    arrival: float
    num_prompt: int = 0
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at first admission
    first_scheduled: float | None = None  # time.monotonic() at first admission
    num_preemptions: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    error: RequestError | None = None  # set with finish_reason "error"
    generator: torch.Generator | None = None
    detok: IncrementalText | None = field(default=None, repr=False)  # set by add_request
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)  # the key's ints
    stop_search_from: int | None = None  # where text after the first min_tokens tokens starts
    stop_scanned: int = 0  # output text length already searched for stop strings
    stop_rewrites: int = 0  # the detokenizer's rewrite count at that search
    # With ``params.logprobs``: one entry per output token. With ``params.prompt_logprobs``:
    # one entry per prompt position of ``key`` (None where nothing predicts it: position 0,
    # virtual tokens, a token after a prefix-tuning span), filled while the prompt is computed.
    logprobs: list[TokenLogprob] = field(default_factory=list, repr=False)
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None, repr=False)
    prompt_scored: bool = False  # every prompt position has been run with its logits kept

    def __post_init__(self) -> None:
        self.num_prompt = len(self.key)

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt must still be computed with logits at every position: such a
        sequence takes nothing from the prefix cache (a cached block has no logits), and
        computes its whole prompt itself, from position 0."""
        return self.params.prompt_logprobs is not None and not self.prompt_scored

    @property
    def namespace(self) -> tuple[str]:
        return (self.tenant,)

    @property
    def num_tokens(self) -> int:
        return len(self.key)


@dataclass(frozen=True)
class RequestError:
    """Why the engine stopped one request alone (the rest of its batch went on).

    ``kind`` is ``"non_finite"`` when the request's own computation produced infinities or
    NaNs (its adapters or prompt drive the model out of range: the request's fault, HTTP 400),
    ``"sampling"`` when its token could not be drawn, ``"engine"`` when running it raised (a
    bug, isolated to this request by re-running its step in parts: HTTP 500)."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """``token``'s log probability under the model's raw distribution (its logits before any
    adjustment, temperature or filter), and the ``top`` most likely tokens with theirs, most
    likely first (the top list may or may not hold ``token``)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What a request has produced so far; ``finished`` once it stops."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (then ``error``)
    num_prompt_tokens: int  # positions before generation, virtual tokens included
    num_cached_tokens: int
    queue_s: float | None = None  # arrival to first admission; None while still waiting
    error: RequestError | None = None
    logprobs: list[TokenLogprob] | None = None  # per output token, when asked for
    # Per prompt position (``prompt_token_ids`` and virtual tokens alike), when asked for.
    prompt_logprobs: list[TokenLogprob | None] | None = None
