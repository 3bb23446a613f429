"""One HTTP request's work in the engine: its submission, deadline, disconnect watch, and the
text deltas a stream sends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi import Request

from server.api.errors import APIError
from server.async_engine import AsyncEngine, EngineInput
from server.engine.request import RequestOutput
from server.metrics import Metrics


@dataclass
class _Timing:
    start: float
    ttft: float | None = None
    last: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)


class ClientGone(Exception):
    """The client closed the connection; its requests were aborted."""


class Job:
    """Engine requests of one HTTP request. ``next()`` yields ``(index, output)`` in arrival
    order; ``close()`` aborts whatever is unfinished (always call it, e.g. in ``finally``).

    Raises ``Overloaded`` from the constructor when the bounded queue is full."""

    def __init__(
        self,
        engine: AsyncEngine,
        inputs: Sequence[EngineInput],
        timeout: float,
        metrics: Metrics | None = None,
    ):
        self.engine = engine
        self.sub = engine.submit(inputs)
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + timeout
        self._watcher: asyncio.Task | None = None
        self._timing = [_Timing(loop.time()) for _ in self.sub.ids] if metrics else []
        self.metrics = metrics
        self.finished: list[tuple[RequestOutput, float | None]] = []  # (output, ttft) for logs

    def watch(self, request: Request) -> None:
        """Abort as soon as the client disconnects (the engine drops the requests before its
        next step) and wake ``next()`` with ``ClientGone``."""
        self._watcher = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.engine.abort(self.sub)
                self.sub.queue.put_nowait((-1, ClientGone()))
                return

    async def next(self) -> tuple[int, RequestOutput]:
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            index, item = await asyncio.wait_for(self.sub.queue.get(), max(remaining, 0))
        except TimeoutError:
            self.close()
            raise APIError(
                503, "the request timed out in the server", code="timeout", retry_after=5
            ) from None
        if isinstance(item, BaseException):
            raise item
        if self.metrics is not None:
            self._observe(index, item)
        return index, item

    def _observe(self, index: int, out: RequestOutput) -> None:
        """Latencies of one engine request, reported once when it ends."""
        t, now = self._timing[index], asyncio.get_running_loop().time()
        for _ in range(len(out.token_ids) - t.tokens):
            if t.last is None:
                t.ttft = now - t.start
            else:
                t.gaps.append(now - t.last)
            t.last = now
        t.tokens = len(out.token_ids)
        if out.finished:
            self.finished.append((out, t.ttft))
            self.metrics.observe_request(  # type: ignore[union-attr]
                t.ttft,
                t.gaps,
                now - t.start,
                out.queue_s,
                out.finish_reason,
                out.num_prompt_tokens,
                len(out.token_ids),
            )

    def close(self) -> None:
        self.engine.abort(self.sub)
        if self._watcher is not None:
            self._watcher.cancel()

    async def results(self) -> list[RequestOutput]:
        """Wait for every request's final output (index order)."""
        final: list[RequestOutput | None] = [None] * len(self.sub.ids)
        try:
            while any(f is None for f in final):
                index, out = await self.next()
                if out.finished:
                    final[index] = out
        finally:
            self.close()
        return final  # type: ignore[return-value]

    async def first(self) -> tuple[int, RequestOutput]:
        """The first output, or the submission's error (raised before any byte is sent, so a
        bad request still gets its status code)."""
        try:
            return await self.next()
        except BaseException:
            self.close()
            raise


class TextDeltas:
    """Turns a request's growing ``RequestOutput.text`` into stream deltas.

    While unfinished, text that could still become a stop string (a suffix of the text that is
    a prefix of one) and a trailing incomplete UTF-8 character (U+FFFD) are held back, so
    every byte sent is final: the engine cuts a matched stop string only when it finishes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.sent = ""

    def update(self, out: RequestOutput) -> str:
        text = out.text
        end = len(text) if out.finished else self._safe_end(text)
        if end <= len(self.sent):
            return ""
        delta = text[len(self.sent) : end]
        self.sent = text[:end]
        return delta

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop), end), hold, -1):
                if text.endswith(stop[:k], 0, end):
                    hold = k
                    break
        return end - hold


def usage(outs: list[RequestOutput], n: int) -> dict:
    """Each prompt counts once (its first choice); completion tokens count for every choice.
    Prompt tokens are positions before generation: adapters' virtual and text tokens included."""
    firsts = outs[::n]
    return {
        "prompt_tokens": sum(o.num_prompt_tokens for o in firsts),
        "completion_tokens": sum(len(o.token_ids) for o in outs),
        "total_tokens": sum(o.num_prompt_tokens for o in firsts)
        + sum(len(o.token_ids) for o in outs),
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in firsts)},
    }
