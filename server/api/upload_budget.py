"""The bytes of adapter uploads held in memory at once, bounded for the whole server.

A multipart upload arrives on disk (Starlette spools every file part over 1 MiB to a
temporary file); its bytes enter memory only while it is processed, under a ``Lease`` of the
app's ``UploadBudget`` (``AppContext.uploads``), so peak memory does not grow with the number
of uploads in flight (``server.api.adapters``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass

from server.engine_client import Overloaded

UPLOAD_WAIT_S = 30.0  # how long an upload may wait for its share before 429
UPLOAD_RETRY_AFTER_S = 5


class UploadsBusy(Overloaded):
    """Uploads being processed held the whole upload budget for ``UPLOAD_WAIT_S``."""

    retry_after = UPLOAD_RETRY_AFTER_S
    code = "uploads_busy"


@dataclass(eq=False)
class _Waiter:
    tenant: str
    nbytes: int
    seq: int
    future: asyncio.Future[None]  # resolved when the bytes are granted


class UploadBudget:
    """The bytes of uploads held in memory at once, shared by every request of one app (one
    budget per app, in its ``AppContext``; never module-global). Event-loop thread only.

    Invariants: ``held <= capacity``; a reservation over ``capacity`` is taken as ``capacity``
    (that upload runs alone), so any one upload can always proceed. Waiters are served tenant
    first: the waiter whose tenant holds the fewest bytes, then the oldest; one that does not
    fit yet blocks those behind it, so a large upload is not starved by a stream of small
    ones, and a tenant with many uploads queued does not make another wait behind all of
    them. A wait longer than
    ``wait_s`` raises ``UploadsBusy`` (429 with Retry-After).
    """

    def __init__(self, capacity: int, wait_s: float = UPLOAD_WAIT_S) -> None:
        if capacity < 1:
            raise ValueError(f"an upload budget needs at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.wait_s = wait_s
        self.held = 0
        self.peak = 0  # the most bytes held at once so far
        self._by_tenant: Counter[str] = Counter()
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    def lease(self, tenant: str) -> Lease:
        return Lease(self, tenant)

    async def _acquire(self, tenant: str, nbytes: int) -> int:
        """Wait for ``nbytes`` (capped at ``capacity``); returns the bytes granted."""
        waiter = _Waiter(
            tenant,
            min(max(nbytes, 0), self.capacity),
            next(self._seq),
            asyncio.get_running_loop().create_future(),
        )
        self._waiters.append(waiter)
        self._grant()
        if waiter.future.done():
            return waiter.nbytes
        try:
            async with asyncio.timeout(self.wait_s):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(tenant, waiter.nbytes)  # granted just as the wait ended
            else:
                waiter.future.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                self._grant()  # those behind it may fit now
            if isinstance(exc, TimeoutError):
                raise UploadsBusy(
                    f"uploads being processed hold the server's upload memory ({self.capacity} "
                    f"bytes) and this one ({waiter.nbytes} bytes) waited {self.wait_s:g} s for "
                    "its share; retry later"
                ) from None
            raise
        return waiter.nbytes

    def _release(self, tenant: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self.held -= nbytes
        self._by_tenant[tenant] -= nbytes
        if self._by_tenant[tenant] <= 0:
            del self._by_tenant[tenant]
        self._grant()

    def _grant(self) -> None:
        while True:
            self._waiters = [w for w in self._waiters if not w.future.done()]
            if not self._waiters:
                return
            first = min(self._waiters, key=lambda w: (self._by_tenant[w.tenant], w.seq))
            if self.held + first.nbytes > self.capacity:
                return
            self._waiters.remove(first)
            self.held += first.nbytes
            self.peak = max(self.peak, self.held)
            self._by_tenant[first.tenant] += first.nbytes
            first.future.set_result(None)


class Lease:
    """One upload's share of an ``UploadBudget``: ``acquire`` once, ``shrink`` when part of
    the bytes are gone; the rest is given back when the ``async with`` block ends. (Growing a
    lease while holding one could deadlock two uploads; acquiring once cannot.)"""

    def __init__(self, budget: UploadBudget, tenant: str) -> None:
        self.budget = budget
        self.tenant = tenant
        self.held = 0
        self._acquired = False

    async def acquire(self, nbytes: int) -> None:
        assert not self._acquired, "a lease is acquired once"
        self._acquired = True
        self.held = await self.budget._acquire(self.tenant, nbytes)

    def shrink(self, nbytes: int) -> None:
        """Keep at most ``nbytes``; the rest goes back to the budget."""
        keep = max(0, min(nbytes, self.held))
        self.budget._release(self.tenant, self.held - keep)
        self.held = keep

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shrink(0)
