"""JSON request bodies, parsed without holding the event loop.

What a body may hold, and why, is ``server.json_parse``'s: nesting up to ``MAX_DEPTH``,
at most ``MAX_VALUES`` values and ``MAX_CONTAINERS`` arrays and objects, valid Unicode text;
anything else is a 400 naming the field at fault where one is known.

Where it is parsed is decided here. ``json.loads`` is one C call holding the GIL, and its cost
grows with the number of values, not the bytes: 8 MiB of text parses in about 15 ms, 8 MiB of
``[[7],[7],...]`` (four million values) in 0.6 s, and while it runs nothing else on the event
loop is answered (``/health`` included). So a body that may hold more than ``INLINE_VALUES``
values (the commas and opening brackets of its bytes say so, in a few milliseconds) goes to
the parser process of ``JsonLane``, and only its bounded result is loaded back here (a
million token ids in about 20 ms); every other body is parsed on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import sys
from collections import Counter
from typing import Any

from server.api.errors import APIError
from server.json_parse import BodyError, parse
from server.json_worker import HEADER

log = logging.getLogger(__name__)

INLINE_VALUES = 1 << 15  # at most ~5 ms of parsing on the event loop, whatever their shape
LANE_TIMEOUT_S = 30.0  # one body's parse takes under a second; past this the process is stuck
LANE_WAITING = 8  # bodies queued for the parser process before 429s (each holds its bytes)
LANE_TENANT_WAITING = 2  # of them, one tenant's: another tenant waits for at most two of its


def load_json(raw: bytes) -> Any:
    """The parsed body, parsed here (on the calling thread), or ``APIError(400)``."""
    try:
        return parse(raw)
    except BodyError as exc:
        raise _refused(exc.message, exc.code, exc.param) from None


async def read_json(lane: JsonLane, raw: bytes, tenant: str) -> Any:
    """``tenant``'s body parsed, or ``APIError``: on the event loop when it holds few values,
    else in ``lane``'s parser process."""
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") < INLINE_VALUES:
        return load_json(raw)
    return await lane.parse(raw, tenant)


class JsonLane:
    """One parser process (``server.json_worker``), started at the first body that needs it,
    taking one body at a time. At most ``waiting`` bodies wait their turn, at most
    ``per_tenant`` of them one tenant's; more answer 429 with ``Retry-After``, so a tenant that
    floods the lane is refused while the others' bodies still get in. A process that dies,
    falls out of step (its caller gave up mid-answer) or takes longer than ``timeout`` seconds
    is killed, and the next body starts a fresh one; the body it failed on is tried once more
    on a fresh process, then answers 503."""

    def __init__(
        self,
        timeout: float = LANE_TIMEOUT_S,
        waiting: int = LANE_WAITING,
        per_tenant: int = LANE_TENANT_WAITING,
    ) -> None:
        self.timeout = timeout
        self.waiting = waiting
        self.per_tenant = per_tenant
        self._queued: Counter[str] = Counter()
        self._lock: asyncio.Lock | None = None
        self._process: asyncio.subprocess.Process | None = None
        self.started = 0  # parser processes started, for tests and logs

    async def parse(self, raw: bytes, tenant: str) -> Any:
        mine, everyone = self._queued[tenant], self._queued.total()
        if mine >= self.per_tenant or everyone >= self.waiting:
            whose = f"{mine} of this tenant's" if mine >= self.per_tenant else f"{everyone}"
            raise APIError(
                429,
                f"{whose} large request bodies are waiting to be parsed; retry shortly",
                code="too_many_large_bodies",
                retry_after=1,
            )
        if self._lock is None:
            self._lock = asyncio.Lock()
        self._queued[tenant] += 1
        try:
            async with self._lock:
                answer = await self._exchange(raw)
        finally:
            self._queued[tenant] -= 1
            if not self._queued[tenant]:
                del self._queued[tenant]
        if answer[0] == "ok":
            return answer[1]
        _, message, code, param = answer
        raise _refused(message, code, param)

    async def _exchange(self, raw: bytes) -> tuple[Any, ...]:
        """The parser's answer for ``raw``. A process that fails is replaced and asked once
        more (it may have died idle, between bodies); a second failure answers 503."""
        for attempt in (1, 2):
            process = await self._running()
            try:
                return await self._ask(process, raw)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                await self.close()
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.error("the JSON parser process failed (%s), attempt %d", why, attempt)
            except BaseException:  # cancelled mid-answer: the process is out of step
                await asyncio.shield(self.close())
                raise
        raise APIError(
            503,
            "the request body could not be parsed: the parser process failed; retry",
            code="parser_unavailable",
            retry_after=1,
        )

    async def _ask(self, process: asyncio.subprocess.Process, raw: bytes) -> tuple[Any, ...]:
        assert process.stdin is not None and process.stdout is not None
        async with asyncio.timeout(self.timeout):
            process.stdin.write(HEADER.pack(len(raw)))
            process.stdin.write(raw)
            await process.stdin.drain()
            (size,) = HEADER.unpack(await process.stdout.readexactly(HEADER.size))
            frame = await process.stdout.readexactly(size)
        answer: tuple[Any, ...] = marshal.loads(frame)
        return answer

    async def _running(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "server.json_worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self.started += 1
        return self._process

    async def close(self) -> None:
        """Kill the parser process, if one runs, and reap it (the next body starts another)."""
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:
                process.kill()
            await process.wait()


def _refused(message: str, code: str, param: str | None) -> APIError:
    return APIError(400, message, code=code, param=param)
