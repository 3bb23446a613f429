"""What the HTTP layer and the engine exchange: the engine's client interface
(``EngineClient``), the requests it takes (``EngineInput``, grouped in a ``Submission``), the
commands its thread applies (typed values, dispatched by type), and the errors it answers with.
``AsyncEngine`` (``server.async_engine``) implements it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from server.engine.request import AdapterSegment, RequestError, RequestOutput, SamplingParams
from server.engine.snapshot import EngineSnapshot
from server.served_model import ServedModel

T = TypeVar("T")


class Overloaded(Exception):
    """The bounded queue is full; retry after ``retry_after`` seconds."""

    retry_after = 1
    code = "overloaded"


class TenantOverloaded(Overloaded):
    """This tenant holds its whole share of the queue; other tenants are still admitted."""

    code = "tenant_share_exceeded"


class EngineUnavailable(Exception):
    """The engine is not loaded yet, failed to load, or has stopped."""

    retry_after = 5


class EngineFailure(Exception):
    """A step raised outside the model's forward (a bug): the requests in the batch are
    failed, the loop goes on."""


class RequestFailed(Exception):
    """The engine stopped this request alone (``error.kind``: ``non_finite`` or ``sampling``,
    the request's own inputs at fault; ``engine``, a failure isolated to it); the rest of its
    batch went on."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class EngineInput:
    """One engine request: prompt token ids after the adapters' segments, in ``tenant``'s
    prefix-cache namespace."""

    prompt_ids: list[int]
    params: SamplingParams
    segments: Sequence[AdapterSegment] = ()
    tenant: str = "default"


Item = RequestOutput | BaseException  # what a submission's queue carries for one request


@dataclass(eq=False)
class Submission:
    """The engine requests of one HTTP request (``n`` choices x prompts), read from ``queue``
    as ``(index, RequestOutput)`` or ``(index, exception)``. Indices follow ``ids``."""

    ids: list[str]
    tenant: str = "default"
    queue: asyncio.Queue[tuple[int, Item]] = field(default_factory=asyncio.Queue)
    done: set[str] = field(default_factory=set)


class Delivery(NamedTuple):
    """One item for one request of a submission, from the engine thread to the loop."""

    sub: Submission
    request_index: int  # in ``sub.ids`` (not ``index``: that would shadow tuple.index)
    item: Item


# Commands: the loop -> the engine thread. ------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Add:
    """Add every input of ``sub``, in order; one refused input refuses the whole submission
    (the inputs already added are aborted) and its error is delivered at its index."""

    sub: Submission
    inputs: tuple[EngineInput, ...]


@dataclass(frozen=True)
class Abort:
    """Stop these requests (unknown or finished ids are ignored) and free their blocks."""

    request_ids: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Fail:
    """End every request in flight with ``error``."""

    error: Exception


@dataclass(frozen=True, eq=False)
class Call(Generic[T]):
    """Run ``fn(served)`` in the engine thread; its result or exception settles ``future``
    (an asyncio future, settled on its loop, or a concurrent one, settled in place)."""

    fn: Callable[[ServedModel], T]
    future: asyncio.Future[T] | concurrent.futures.Future[T]


@dataclass(frozen=True)
class Stop:
    """Fail what is in flight and every call still queued, then end the engine thread."""


Command = Add | Abort | Fail | Call[Any] | Stop


# The interface the HTTP layer uses. ------------------------------------------------------------
class EngineClient(Protocol):
    """What the HTTP layer may ask of the engine; ``AsyncEngine`` is the implementation.

    Members are used from the event loop's thread (``snapshot`` and ``admission_counts``
    from any thread). None of them reaches into the engine's objects: work goes to the engine
    thread as commands; what comes back is outputs, the published ``ModelFacts``
    (``served.facts``, with the read-only tokenizer) and ``EngineSnapshot``s."""

    served: ServedModel | None  # set once, when the model has loaded
    load_error: BaseException | None

    @property
    def alive(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    @property
    def outstanding(self) -> int: ...

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    async def wait_loaded(self, timeout: float | None = None) -> bool: ...

    def submit(self, inputs: Sequence[EngineInput]) -> Submission: ...

    def check_admission(
        self, count: int, tenant: str | None = None, final: bool = False
    ) -> None: ...

    def abort(self, sub: Submission) -> None: ...

    def fail_all(self, exc: Exception) -> None: ...

    async def call(self, fn: Callable[[ServedModel], T]) -> T: ...

    def snapshot(self) -> EngineSnapshot: ...

    def admission_counts(self) -> dict[str, int]: ...
