"""The synchronous engine driven from asyncio: one dedicated thread owns every engine call.

The event loop never touches the engine. It sends commands (add, abort, call) through a
thread-safe queue; the engine thread applies them between steps, runs ``step()`` while anything
is unfinished, and hands each output back to the submitting handler's ``asyncio.Queue`` with
``loop.call_soon_threadsafe`` (one hop per step). An abort is therefore applied before the next
step starts: a request aborted during step k holds its KV blocks at most until step k ends.

Admission is bounded: at most ``capacity`` engine requests may be outstanding (submitted and
not yet finished or aborted); past that ``submit`` raises ``Overloaded`` and changes nothing.
With a tenant share, one tenant may hold at most ``tenant_limit`` of them, so a tenant that
floods the server is answered 429 while the others are still admitted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from server.engine.request import (
    AdapterSegment,
    InvalidRequest,
    RequestError,
    RequestOutput,
    SamplingParams,
)

log = logging.getLogger(__name__)
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


@dataclass(eq=False)
class Submission:
    """The engine requests of one HTTP request (``n`` choices x prompts), read from ``queue``
    as ``(index, RequestOutput)`` or ``(index, exception)``. Indices follow ``ids``."""

    ids: list[str]
    tenant: str = "default"
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: set[str] = field(default_factory=set)


class AsyncEngine:
    """Builds the model with ``build()`` in its own thread, then serves submissions.

    ``build`` returns an ``server.llm.LLM`` (model, tokenizer, adapters shape, engine).
    Thread ownership: ``llm.engine`` is touched only by the engine thread; ``llm.tokenizer``,
    ``llm.model_id``, ``llm.shape`` and ``llm.limits`` are read-only and safe from the loop.
    """

    def __init__(
        self, build: Callable[[], Any], capacity: int, tenant_limit: int | None = None
    ) -> None:
        """``tenant_limit``: the most outstanding engine requests one tenant may hold (None:
        no per-tenant limit, e.g. a single-tenant server)."""
        self._build = build
        self.capacity = capacity
        self.tenant_limit = tenant_limit
        self.admissions: Counter[str] = Counter()  # outcome -> submissions (loop thread)
        self._by_tenant: Counter[str] = Counter()  # tenant -> outstanding (loop thread)
        self.llm: Any = None
        self.load_error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live: dict[str, Submission] = {}  # loop thread only
        self._ids = itertools.count()

    # Lifecycle (loop thread) ---------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self.llm is not None and self.alive

    async def wait_loaded(self, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self._loaded.wait, timeout)

    @property
    def outstanding(self) -> int:
        """Engine requests submitted and not yet finished or aborted."""
        return len(self._live)

    # Requests (loop thread) ----------------------------------------------------------------
    def submit(self, inputs: Sequence[EngineInput]) -> Submission:
        """Queue ``inputs`` (all of one tenant) as one submission. Raises ``Overloaded``
        (nothing queued) when the outstanding count would pass ``capacity`` or the tenant's
        limit; errors of a single input (``InvalidRequest``) arrive on the submission's queue
        and abort the rest of the submission."""
        tenant = inputs[0].tenant if inputs else "default"
        self.check_admission(len(inputs), tenant, final=True)
        sub = Submission([f"req-{next(self._ids)}" for _ in inputs], tenant)
        for rid in sub.ids:
            self._live[rid] = sub
        self._by_tenant[tenant] += len(sub.ids)
        self._commands.put(("add", sub, list(inputs)))
        return sub

    def check_admission(self, count: int, tenant: str | None = None, final: bool = False) -> None:
        """Raise ``EngineUnavailable`` or ``Overloaded`` if ``count`` more engine requests of
        ``tenant`` would not be accepted now. Handlers call it early, before any costly work
        (adapter look-ups, tokenization), so that a refusal under overload stays cheap;
        ``submit`` calls it again (``final``: the outcome is counted in ``admissions``)."""
        refusal = self._refusal(count, tenant)
        if final or refusal is not None:
            self.admissions[refusal[0] if refusal else "admitted"] += 1
        if refusal is not None:
            raise refusal[1]

    def _refusal(self, count: int, tenant: str | None) -> tuple[str, Exception] | None:
        """(outcome, error) if ``count`` more requests of ``tenant`` cannot be taken now."""
        if not self.ready:
            return "unavailable", EngineUnavailable("the model is not loaded yet")
        held = self._by_tenant[tenant] if tenant is not None else 0
        if self.tenant_limit is not None and held + count > self.tenant_limit:
            return "tenant_share", TenantOverloaded(
                f"this tenant has {held} requests in flight and its share of the server is "
                f"{self.tenant_limit}; retry later"
            )
        if len(self._live) + count > self.capacity:
            return "capacity", Overloaded(
                f"{len(self._live)} requests are in flight (capacity {self.capacity}); retry later"
            )
        return None

    def abort(self, sub: Submission) -> None:
        """Stop every unfinished request of ``sub``; their blocks are freed before the next
        step. Idempotent."""
        ids = [rid for rid in sub.ids if rid not in sub.done]
        for rid in ids:
            self._retire(sub, rid)
        if ids:
            self._commands.put(("abort", ids))

    def fail_all(self, exc: Exception) -> None:
        """End every request in flight with ``exc`` (e.g. at the end of a drain); their
        handlers answer it and the engine frees their blocks before its next step."""
        self._commands.put(("fail", exc))

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(llm)`` in the engine thread between two steps and return its result.

        Torch work of the server's handlers goes through here (an upload's validation and
        conversion; decoding a stored blob starts no parallel region): with OpenMP, each
        thread that starts a parallel region gets a team of its own, and once there are more
        such threads than cores, every team's workers stop spinning between regions: the
        engine's steps got 15-60% slower after one upload had been validated in a worker
        thread."""
        assert self._loop is not None
        if not self.alive:
            raise EngineUnavailable("the engine has stopped")
        fut: asyncio.Future = self._loop.create_future()
        self._commands.put(("call", fn, fut))
        return await fut

    def call_blocking(self, fn: Callable[[Any], T], timeout: float = 60.0) -> T:
        """``call`` for other threads (never the loop's): worker threads, tests."""
        if not self.alive:
            raise EngineUnavailable("the engine has stopped")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        return fut.result(timeout)

    def _dispatch(self, items: list[tuple[Submission, int, Any]]) -> None:
        """Loop side of a delivery: queue items, retire finished requests."""
        for sub, index, item in items:
            rid = sub.ids[index]
            if rid in sub.done:
                continue  # aborted meanwhile: the handler is gone
            if isinstance(item, BaseException) or item.finished:
                self._retire(sub, rid)
            sub.queue.put_nowait((index, item))

    def _retire(self, sub: Submission, rid: str) -> None:
        """``rid`` no longer counts as outstanding (loop thread)."""
        sub.done.add(rid)
        if self._live.pop(rid, None) is not None:
            self._by_tenant[sub.tenant] -= 1
            if self._by_tenant[sub.tenant] <= 0:
                del self._by_tenant[sub.tenant]

    # Engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.llm = self._build()
        except BaseException as exc:  # reported by /ready and every request
            log.exception("loading the model failed")
            self.load_error = exc
            self._loaded.set()
            return
        self._loaded.set()
        engine = self.llm.engine
        routes: dict[str, tuple[Submission, int]] = {}
        while True:
            for cmd in self._take(block=not engine.has_unfinished()):
                if cmd[0] == "stop":
                    self._stop(routes)
                    return
                self._apply(cmd, routes)
            # Not kept while waiting for the next command: a call's closure may hold an
            # upload's bytes, which would stay alive until then.
            cmd = None
            if engine.has_unfinished():
                self._step(routes)

    def _stop(self, routes: dict[str, tuple[Submission, int]]) -> None:
        """Fail what is in flight and every call still queued (nobody will run them)."""
        gone = EngineUnavailable("the server is shutting down")
        self._fail_all(routes, gone)
        for cmd in self._take(block=False):
            if cmd[0] == "call":
                self._settle_call(cmd[2], None, gone)

    def _take(self, block: bool) -> list[tuple]:
        cmds = [self._commands.get()] if block else []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _apply(self, cmd: tuple, routes: dict[str, tuple[Submission, int]]) -> None:
        engine = self.llm.engine
        if cmd[0] == "add":
            _, sub, inputs = cmd
            for index, (rid, inp) in enumerate(zip(sub.ids, inputs, strict=True)):
                try:
                    engine.add_request(rid, inp.prompt_ids, inp.params, inp.segments, inp.tenant)
                except (InvalidRequest, ValueError) as exc:
                    for other in sub.ids[:index]:
                        engine.abort(other)
                        routes.pop(other, None)
                    self._send([(sub, index, exc)])
                    return
                routes[rid] = (sub, index)
        elif cmd[0] == "abort":
            for rid in cmd[1]:
                engine.abort(rid)
                routes.pop(rid, None)
        elif cmd[0] == "fail":
            self._fail_all(routes, cmd[1])
        elif cmd[0] == "call":
            _, fn, fut = cmd
            try:
                result, error = fn(self.llm), None
            except Exception as exc:
                result, error = None, exc
            self._settle_call(fut, result, error)

    def _settle_call(self, fut, result: Any, error: BaseException | None) -> None:
        if isinstance(fut, concurrent.futures.Future):
            _settle(fut, result, error)
        else:
            self._loop.call_soon_threadsafe(_settle, fut, result, error)

    def _step(self, routes: dict[str, tuple[Submission, int]]) -> None:
        engine = self.llm.engine
        try:
            outputs: list[RequestOutput] = engine.step()
        except Exception as exc:
            log.exception("engine step failed")
            self._fail_all(routes, EngineFailure(f"engine step failed: {exc}"))
            return
        items: list[tuple[Submission, int, Any]] = []
        for out in outputs:
            route = routes.get(out.request_id)
            if route is None:
                continue
            if out.finished:
                del routes[out.request_id]
            items.append((*route, out if out.error is None else RequestFailed(out.error)))
        self._send(items)

    def _fail_all(self, routes: dict[str, tuple[Submission, int]], exc: Exception) -> None:
        for rid in list(routes):
            self.llm.engine.abort(rid)
        self._send([(sub, index, exc) for sub, index in routes.values()])
        routes.clear()

    def _send(self, items: list[tuple[Submission, int, Any]]) -> None:
        if items:
            self._loop.call_soon_threadsafe(self._dispatch, items)


def _settle(
    fut: asyncio.Future | concurrent.futures.Future, result: Any, error: BaseException | None
) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
