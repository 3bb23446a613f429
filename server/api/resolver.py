"""Adapter names of a request -> engine segments, in the caller's tenant only.

Loaded segments are kept in a small LRU keyed by the record id (one id per version), so a
new version is loaded afresh while requests already running keep the segment they started
with. Store calls block (SQLite, Redis, blob reads) and run in worker threads.

While the registry is unreachable, names this replica holds still resolve (``AdapterStore.
lookup``); the resolution then says it is possibly stale (``server/api/degraded.py``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from adapters_store.types import AdapterNotFound, InvalidName
from server.api.errors import APIError, not_found
from server.engine.request import AdapterSegment
from server.served_model import to_segment

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore

MAX_ADAPTERS_PER_REQUEST = 8


class Resolution(NamedTuple):
    """A request's adapter segments, in order; ``stale``: at least one was resolved from
    what this replica held because the registry did not answer."""

    segments: list[AdapterSegment]
    stale: bool


class AdapterResolver:
    def __init__(
        self, store: AdapterStore, tokenizer: Callable[[], Any], max_entries: int = 64
    ) -> None:
        """``tokenizer()`` returns the base model's tokenizer (text adapters are tokenized
        when loaded); it is called lazily because the model may still be loading."""
        self._store = store
        self._tokenizer = tokenizer
        self._max = max_entries
        # record id -> (tenant, name, segment)
        self._cache: OrderedDict[str, tuple[str, str, AdapterSegment]] = OrderedDict()
        self._lock = threading.Lock()  # the cache is filled from worker threads

    async def segments(
        self, tenant: str, model: str, base_id: str, extra: list[str]
    ) -> list[AdapterSegment]:
        """``model`` (the base id, or one of the tenant's adapters) then ``extra``, in order.
        An adapter that does not exist in ``tenant`` is a 404, whoever else owns one."""
        return (await self.resolve(tenant, model, base_id, extra)).segments

    async def resolve(self, tenant: str, model: str, base_id: str, extra: list[str]) -> Resolution:
        """``segments``, and whether any was resolved without the registry."""
        names = ([] if model == base_id else [model]) + list(extra)
        if len(names) > MAX_ADAPTERS_PER_REQUEST:
            raise APIError(
                400,
                f"at most {MAX_ADAPTERS_PER_REQUEST} adapters per request",
                code="invalid_request",
                param="adapters",
            )
        out, stale = [], False
        for i, name in enumerate(names):
            param = "model" if i == 0 and model != base_id else "adapters"
            what = "model" if param == "model" else "adapter"
            try:
                seg, held = await asyncio.to_thread(self._segment, tenant, name)
            except (AdapterNotFound, InvalidName):
                raise not_found(what, name, param) from None
            out.append(seg)
            stale = stale or held
        return Resolution(out, stale)

    def _segment(self, tenant: str, name: str) -> tuple[AdapterSegment, bool]:
        record, stale = self._store.lookup(tenant, name)
        with self._lock:
            hit = self._cache.get(record.id)
            if hit is not None:
                self._cache.move_to_end(record.id)
                return hit[2], stale
        seg = to_segment(self._store.load(record), self._tokenizer())
        with self._lock:
            self._cache[record.id] = (tenant, name, seg)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return seg, stale

    def on_store_event(self, event: str, tenant: str, name: str) -> None:
        """Store subscription callback (any thread): drop the segments of a changed or
        deleted adapter ("reset": all of them); running requests keep theirs."""
        with self._lock:
            if event == "reset":
                self._cache.clear()
                return
            for rid in [k for k, v in self._cache.items() if v[:2] == (tenant, name)]:
                del self._cache[rid]
