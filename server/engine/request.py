"""Plain data exchanged by the engine's parts: sampling parameters, sequences, outputs."""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # plain data: the scheduler and its tests run without torch
    import torch


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
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
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequest(message, param)


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
    detok: Any = field(default=None, repr=False)  # the engine's IncrementalText of the output
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)  # the key's ints
    stop_search_from: int | None = None  # where text after the first min_tokens tokens starts
    stop_scanned: int = 0  # output text length already searched for stop strings
    stop_rewrites: int = 0  # the detokenizer's rewrite count at that search

    def __post_init__(self) -> None:
        self.num_prompt = len(self.key)

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
