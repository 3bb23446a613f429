"""One HTTP request's work in the engine: its submission, deadline, disconnect watch, and the
text deltas a stream sends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from server.api.errors import APIError
from server.engine.request import RequestOutput
from server.engine_client import EngineClient, EngineInput, EngineUnavailable
from server.metrics import Metrics


@dataclass
class _Timing:
    """One engine request of a job, as the job has seen it (times on the loop's clock)."""

    start: float
    ttft: float | None = None
    last: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    latest: RequestOutput | None = None  # the last output delivered
    ended: bool = False  # counted in the metrics and listed in ``Job.finished``


class ClientGone(Exception):
    """The client closed the connection; its requests were aborted."""


class Job:
    """Engine requests of one HTTP request. ``next()`` yields ``(index, output)`` in arrival
    order; ``close()`` aborts whatever is unfinished (always call it, e.g. in ``finally``; it is
    idempotent, and the HTTP layer calls it again once the answer is over).

    Every engine request is accounted for exactly once, when it ends: in ``finished`` (for the
    request's log line) and, with ``metrics``, in the per-request metrics. One that finished
    keeps its reason; one the engine stopped with an error counts as ``error``; one still
    unfinished when the job closes (its client went away, it timed out, the drain gave up on
    it) counts as ``abort``, with the tokens delivered until then. A submission the engine
    refused (an invalid prompt: nothing ran) is not counted.

    Raises ``Overloaded`` from the constructor when the bounded queue is full."""

    def __init__(
        self,
        engine: EngineClient,
        inputs: Sequence[EngineInput],
        timeout: float,
        metrics: Metrics | None = None,
    ):
        self.engine = engine
        self.inputs = list(inputs)
        self.sub = engine.submit(inputs)
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + timeout
        self._watcher: asyncio.Task[None] | None = None
        self._timing = [_Timing(loop.time()) for _ in self.sub.ids]
        self.metrics = metrics
        self.finished: list[tuple[RequestOutput, float | None]] = []  # (output, ttft) for logs
        self.error_type: str | None = None  # an error sent inside a stream (for the log line)
        self._failed: set[int] = set()  # indices the engine stopped with an error
        self._refused = False  # the engine refused the submission: none of it ran
        self._closed = False

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
            self._note_error(index, item)
            raise item
        self._observe(index, item)
        return index, item

    def _note_error(self, index: int, exc: BaseException) -> None:
        if isinstance(exc, ValueError):  # InvalidRequest at submission: nothing ran
            self._refused = True
        elif index >= 0 and not isinstance(exc, EngineUnavailable):  # not the drain's abort
            self._failed.add(index)

    def _observe(self, index: int, out: RequestOutput) -> None:
        """Latencies of one engine request; reported once, when it ends."""
        t, now = self._timing[index], asyncio.get_running_loop().time()
        for _ in range(len(out.token_ids) - t.tokens):
            if t.last is None:
                t.ttft = now - t.start
            else:
                t.gaps.append(now - t.last)
            t.last = now
        t.tokens = len(out.token_ids)
        t.latest = out
        if out.finished:
            self._end(index, out)

    def _end(self, index: int, out: RequestOutput) -> None:
        t = self._timing[index]
        if t.ended:
            return
        t.ended = True
        self.finished.append((out, t.ttft))
        if self.metrics is not None:
            self.metrics.observe_request(
                t.ttft,
                t.gaps,
                asyncio.get_running_loop().time() - t.start,
                out.queue_s,
                out.finish_reason,
                out.num_prompt_tokens,
                len(out.token_ids),
            )

    def close(self) -> None:
        """Abort what is unfinished and account for every engine request (once)."""
        if self._closed:
            return
        self._closed = True
        self.engine.abort(self.sub)
        if self._watcher is not None:
            self._watcher.cancel()
        while True:  # outputs delivered but not read: they happened
            try:
                index, item = self.sub.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(item, BaseException):
                self._note_error(index, item)
            else:
                self._observe(index, item)
        if self._refused:
            return
        for index, t in enumerate(self._timing):
            if not t.ended:
                self._end(
                    index, self._stopped(index, "error" if index in self._failed else "abort")
                )

    def _stopped(self, index: int, reason: str) -> RequestOutput:
        """The final output of a request that ended without finishing: what it had."""
        latest = self._timing[index].latest
        if latest is not None:
            return replace(latest, finished=True, finish_reason=reason)
        inp = self.inputs[index]  # nothing came: it never left the queue
        prefix = [t for seg in inp.segments if seg.kind == "text" for t in seg.token_ids]
        virtual = sum(seg.length for seg in inp.segments if seg.kind != "text")
        return RequestOutput(
            request_id=self.sub.ids[index],
            prompt_token_ids=prefix + list(inp.prompt_ids),
            token_ids=[],
            text="",
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=virtual + len(prefix) + len(inp.prompt_ids),
            num_cached_tokens=0,
        )

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
    every byte sent is final: the engine cuts a matched stop string only when it finishes.

    The work of one ``update`` does not grow with the output: the sent length is an int, each
    stop string's held-back suffix is followed by an incremental matcher that reads only the
    text new since the last update (amortised), and the check that the text it has read is
    unchanged compares at most the longest stop string's length. Only trailing U+FFFD
    characters are re-read (the detokenizer never leaves one while a request runs)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.sent = 0  # characters of the text already sent
        self._matchers = [_StopPrefix(stop) for stop in self.stops if stop]
        self._window = max((len(s) for s in self.stops), default=0)
        self._read = 0  # characters of the text the matchers have read (never ending in U+FFFD)
        self._tail = ""  # the last ``_window`` of those characters, to notice a rewrite

    def update(self, out: RequestOutput) -> str:
        text = out.text
        end = len(text) if out.finished else self._safe_end(text)
        if end <= self.sent:
            return ""
        delta = text[self.sent : end]
        self.sent = end
        return delta

    def _safe_end(self, text: str) -> int:
        if self._matchers and (
            len(text) < self._read or text[self._read - len(self._tail) : self._read] != self._tail
        ):
            # The detokenizer rewrote text already read (rare). A held-back suffix is at most
            # the longest stop string, so re-reading that much restores the matchers.
            for matcher in self._matchers:
                matcher.matched = 0
            self._read = max(min(self._read, len(text)) - self._window, 0)
            self._tail = ""
        end = len(text)
        while end > self._read and text[end - 1] == "\ufffd":
            end -= 1
        if not self._matchers:
            return end
        if end > self._read:
            new = text[self._read : end]
            for matcher in self._matchers:
                matcher.feed(new)
            self._read = end
            self._tail = text[max(end - self._window, 0) : end]
        return end - max(m.matched for m in self._matchers)


class _StopPrefix:
    """The longest suffix of the text fed so far that is a prefix of ``stop`` (the whole of
    ``stop`` included), kept by Knuth-Morris-Pratt: each character fed costs O(1) amortised,
    and the failure table is built only as far as a match has reached, so a long stop string
    costs nothing until the text grows into it."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        self._fail = [0]  # _fail[i]: longest proper border of stop[: i + 1]

    def feed(self, text: str) -> None:
        stop, k = self.stop, self.matched
        for ch in text:
            while k and (k == len(stop) or stop[k] != ch):
                k = self._border(k - 1)
            if stop[k] == ch:
                k += 1
        self.matched = k

    def _border(self, i: int) -> int:
        """``_fail[i]``, extending the table as needed (amortised O(1) per entry)."""
        fail, stop = self._fail, self.stop
        while len(fail) <= i:
            q, k = len(fail), fail[-1]
            while k and stop[q] != stop[k]:
                k = fail[k - 1]
            fail.append(k + 1 if stop[q] == stop[k] else 0)
        return fail[i]


def usage(outs: list[RequestOutput], n: int) -> dict[str, Any]:
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
