"""The synchronous engine driven from asyncio: one dedicated thread owns every engine call.

The event loop never touches the engine. It sends commands (``Add``, ``Abort``, ``Fail``,
``Call``, ``Stop``: typed values, dispatched by type) through a thread-safe queue; the engine
thread applies them between steps, runs ``step()`` while anything is unfinished, and hands each
output back to the submitting handler's ``asyncio.Queue`` with ``loop.call_soon_threadsafe``
(one hop per step). An abort is therefore applied before the next step starts: a request
aborted during step k holds its KV blocks at most until step k ends.

What flows back besides outputs is published, never read across threads: the model's
``ModelFacts`` once, when it loads (``served.facts``), and an ``EngineSnapshot`` of the
engine's counters after every step (and after commands when no step follows), swapped in whole
so any thread reads one consistent moment (``snapshot()``).

Admission is bounded: at most ``capacity`` engine requests may be outstanding (submitted and
not yet finished or aborted); past that ``submit`` raises ``Overloaded`` and changes nothing.
With a tenant share, one tenant may hold at most ``tenant_limit`` of them, so a tenant that
floods the server is answered 429 while the others are still admitted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, assert_never

from server.engine.request import (
    InvalidRequest,
    RequestOutput,
)
from server.engine.snapshot import EngineSnapshot, SnapshotBuilder
from server.engine_client import (
    Abort,
    Add,
    Call,
    Command,
    Delivery,
    EngineFailure,
    EngineInput,
    EngineUnavailable,
    Fail,
    Item,
    Overloaded,
    RequestFailed,
    Stop,
    Submission,
    TenantOverloaded,
)
from server.served_model import ServedModel

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
Routes = dict[str, tuple[Submission, int]]  # request id -> its submission and index
T = TypeVar("T")

# When the engine wakes from idle for a new request, it keeps taking requests while they keep
# arriving (each within GATHER_GAP_S of the last, GATHER_MAX_S in all) before its first step:
# clients that send a burst at once get one first step for the burst, not a first step for
# the first request while the rest wait for it to end.
GATHER_GAP_S = 0.003
GATHER_MAX_S = 0.03


class AsyncEngine:
    """Builds the model with ``build()`` in its own thread, then serves submissions.

    ``build`` returns a ``ServedModel`` (``server.served_model.load_served_model``). Thread
    ownership: ``served.engine`` is touched only by the engine thread; ``served.facts`` and
    ``served.tokenizer`` are read-only and safe from the loop. Implements ``EngineClient``."""

    def __init__(
        self, build: Callable[[], ServedModel], capacity: int, tenant_limit: int | None = None
    ) -> None:
        """``tenant_limit``: the most outstanding engine requests one tenant may hold (None:
        no per-tenant limit, e.g. a single-tenant server)."""
        self._build = build
        self.capacity = capacity
        self.tenant_limit = tenant_limit
        self.admissions: Counter[str] = Counter()  # outcome -> submissions (loop thread)
        self._by_tenant: Counter[str] = Counter()  # tenant -> outstanding (loop thread)
        self.served: ServedModel | None = None
        self.load_error: BaseException | None = None
        # Written by the engine thread only, always a whole new snapshot (never mutated).
        self._snapshot = EngineSnapshot()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
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
            self._commands.put(Stop())
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self.served is not None and self.alive

    async def wait_loaded(self, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self._loaded.wait, timeout)

    @property
    def outstanding(self) -> int:
        """Engine requests submitted and not yet finished or aborted."""
        return len(self._live)

    # Published state (any thread) ----------------------------------------------------------
    def snapshot(self) -> EngineSnapshot:
        """The engine's counters after its latest step (or command, when no step followed);
        all zero until the model has loaded."""
        return self._snapshot

    def admission_counts(self) -> dict[str, int]:
        """Submissions by admission outcome since start (a copy)."""
        return dict(self.admissions)

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
        self._commands.put(Add(sub, tuple(inputs)))
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
        ids = tuple(rid for rid in sub.ids if rid not in sub.done)
        for rid in ids:
            self._retire(sub, rid)
        if ids:
            self._commands.put(Abort(ids))

    def fail_all(self, exc: Exception) -> None:
        """End every request in flight with ``exc`` (e.g. at the end of a drain); their
        handlers answer it and the engine frees their blocks before its next step."""
        self._commands.put(Fail(exc))

    async def call(self, fn: Callable[[ServedModel], T]) -> T:
        """Run ``fn(served)`` in the engine thread between two steps and return its result.

        Torch work of the server's handlers goes through here (an upload's validation and
        conversion; decoding a stored blob starts no parallel region): with OpenMP, each
        thread that starts a parallel region gets a team of its own, and once there are more
        such threads than cores, every team's workers stop spinning between regions: the
        engine's steps got 15-60% slower after one upload had been validated in a worker
        thread."""
        assert self._loop is not None
        if not self.alive:
            raise EngineUnavailable("the engine has stopped")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._commands.put(Call(fn, fut))
        return await fut

    def call_blocking(self, fn: Callable[[ServedModel], T], timeout: float = 60.0) -> T:
        """``call`` for other threads (never the loop's): worker threads, tests."""
        if not self.alive:
            raise EngineUnavailable("the engine has stopped")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put(Call(fn, fut))
        return fut.result(timeout)

    def _dispatch(self, deliveries: list[Delivery]) -> None:
        """Loop side of a delivery: queue items, retire finished requests."""
        for sub, index, item in deliveries:
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
            served = self._build()
        except BaseException as exc:  # reported by /ready and every request
            log.exception("loading the model failed")
            self.load_error = exc
            self._loaded.set()
            return
        driver = _EngineLoop(self, served)
        driver.publish()  # the engine as loaded, before anything is admitted
        # What start-up built (the model's modules, the tokenizer, the app) lives as long as
        # the engine: frozen out of the collector, a full collection scans only what requests
        # create. A full collection holds every thread, the event loop's included: 0.3-0.38 s
        # each, measured in a process holding 670k objects (the test suite's).
        gc.collect()
        gc.freeze()
        self.served = served
        self._loaded.set()
        try:
            driver.run()
        finally:
            gc.unfreeze()  # collectable again: the process may outlive its engine


class _EngineLoop:
    """The engine thread's side of an ``AsyncEngine``: takes commands from its queue and
    applies them between steps, steps while anything is unfinished, hands outputs to its event
    loop, and publishes a snapshot in its ``_snapshot`` slot once per iteration. Used only by
    the engine thread.

    Every request enters and leaves the engine here (or inside a ``Call``, after which the
    census is recounted), so the snapshot builder's adapter census follows by events."""

    def __init__(self, owner: AsyncEngine, served: ServedModel) -> None:
        assert owner._loop is not None, "started without an event loop"
        self.owner = owner
        self.commands = owner._commands
        self.loop = owner._loop
        self.served = served
        self.engine = served.engine
        self.stats = SnapshotBuilder(served.engine)
        self.routes: Routes = {}

    def run(self) -> None:
        engine = self.engine
        command: Command | None
        while True:
            idle = not engine.has_unfinished()
            for command in self.take(block=idle, gather=idle):
                if isinstance(command, Stop):
                    self.stop()
                    self.publish()
                    return
                self.apply(command)
            # Not kept while waiting for the next command: a call's closure may hold an
            # upload's bytes, which would stay alive until then.
            command = None
            # An iteration applied commands, ran a step, or both; after commands with a step
            # to follow, the step's snapshot covers both (one build per iteration).
            if engine.has_unfinished():
                self.step()
            self.publish()

    def publish(self) -> None:
        """Swap in a new snapshot (one reference assignment: atomic for every reader)."""
        try:
            self.owner._snapshot = self.stats.build()
        except Exception:  # a bug in the stats must not stop serving: keep the last one
            log.exception("building the engine snapshot failed")

    def stop(self) -> None:
        """Fail what is in flight and every call still queued (nobody will run them)."""
        gone = EngineUnavailable("the server is shutting down")
        self.fail_all(gone)
        for command in self.take(block=False):
            if isinstance(command, Call):
                self.settle_call(command.future, None, gone)

    def take(self, block: bool, gather: bool = False) -> list[Command]:
        """The queued commands (waiting for one when ``block``); with ``gather``, once a request
        is among them, also those that follow within ``GATHER_GAP_S`` of each other."""
        commands = [self.commands.get()] if block else []
        while True:
            try:
                commands.append(self.commands.get_nowait())
            except queue.Empty:
                break
        if gather and any(isinstance(c, Add) for c in commands):
            deadline = time.monotonic() + GATHER_MAX_S
            while (left := deadline - time.monotonic()) > 0:
                try:
                    commands.append(self.commands.get(timeout=min(GATHER_GAP_S, left)))
                except queue.Empty:
                    break
        return commands

    def apply(self, command: Command) -> None:
        match command:
            case Add():
                self.add(command)
            case Abort():
                for rid in command.request_ids:
                    self.abort(rid)
            case Fail():
                self.fail_all(command.error)
            case Call():
                try:
                    result, error = command.fn(self.served), None
                except Exception as exc:
                    result, error = None, exc
                finally:
                    self.stats.resync()  # the call may have added or ended requests itself
                self.settle_call(command.future, result, error)
            case Stop():
                raise AssertionError("Stop ends the loop before it is applied")
            case _:
                assert_never(command)

    def add(self, command: Add) -> None:
        sub = command.sub
        for index, (rid, inp) in enumerate(zip(sub.ids, command.inputs, strict=True)):
            try:
                seq = self.engine.add_request(
                    rid, inp.prompt_ids, inp.params, inp.segments, inp.tenant
                )
            except (InvalidRequest, ValueError) as exc:
                for other in sub.ids[:index]:
                    self.abort(other)
                self.send([Delivery(sub, index, exc)])
                return
            self.stats.entered(seq)
            self.routes[rid] = (sub, index)

    def abort(self, rid: str) -> None:
        self.engine.abort(rid)
        self.stats.left(rid)
        self.routes.pop(rid, None)

    def step(self) -> None:
        try:
            outputs: list[RequestOutput] = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed")
            self.stats.resync()  # requests may have ended inside the step that raised
            self.fail_all(EngineFailure(f"engine step failed: {exc}"))
            return
        deliveries: list[Delivery] = []
        for out in outputs:
            if out.finished:
                self.stats.left(out.request_id)
            route = self.routes.get(out.request_id)
            if route is None:
                continue
            if out.finished:
                del self.routes[out.request_id]
            item: Item = out if out.error is None else RequestFailed(out.error)
            deliveries.append(Delivery(*route, item))
        self.send(deliveries)

    def fail_all(self, exc: Exception) -> None:
        routes = self.routes
        for rid in list(routes):
            self.engine.abort(rid)
            self.stats.left(rid)
        self.send([Delivery(sub, index, exc) for sub, index in routes.values()])
        routes.clear()

    def send(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            self.loop.call_soon_threadsafe(self.owner._dispatch, deliveries)

    def settle_call(
        self,
        fut: asyncio.Future[Any] | concurrent.futures.Future[Any],
        result: Any,
        error: BaseException | None,
    ) -> None:
        if isinstance(fut, concurrent.futures.Future):
            _settle(fut, result, error)
        else:
            self.loop.call_soon_threadsafe(_settle, fut, result, error)


def _settle(
    fut: asyncio.Future[Any] | concurrent.futures.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
