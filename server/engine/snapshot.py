"""What the engine publishes after each step: a frozen ``EngineSnapshot`` of its counters and
gauges, built in the thread that owns the engine (``SnapshotBuilder``) and read by any other
(the metrics scrape) without touching the engine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapters_store.tiers import TierStats

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.request import Sequence


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state between two steps, built in the engine thread and published whole
    (one reference swap), so a reader on any thread sees one moment, never a mix of two.

    Counters are totals since the engine was built; gauges are the moment's. All zero (and no
    device tier) until the model is loaded. ``device_tier``'s histogram is a copy owned by
    this snapshot: nobody mutates it."""

    running: int = 0  # sequences in the running batch
    waiting: int = 0  # sequences queued for admission (preempted ones included)
    kv_usage: float = 0.0  # distinct blocks held by running sequences / all blocks
    kv_occupied: float = 0.0  # blocks not free (sequences' or cached prefixes') / all blocks
    free_blocks: int = 0
    cached_blocks: int = 0  # blocks the prefix tree holds (shared with sequences or evictable)
    prompt_tokens: int = 0  # positions of first-admitted prompts, virtual tokens included
    cached_prompt_tokens: int = 0  # of those, taken from the prefix cache
    generation_tokens: int = 0
    computed_tokens: int = 0  # positions run through the model or copied as prefix KV
    preemptions: int = 0  # for lack of KV blocks
    share_preemptions: int = 0  # to seat a tenant below its share of the seats or blocks
    steps: int = 0  # iterations that ran the model
    failed_requests: int = 0  # stopped alone with an error while the rest of a step went on
    split_forwards: int = 0  # forwards that raised and were re-run in halves
    adapters_running: int = 0  # distinct adapters (not text prefixes) of running sequences
    adapters_waiting: int = 0  # distinct adapters (not text prefixes) of waiting sequences
    device_tier: TierStats | None = None  # the runner's tier of adapter tensors


class SnapshotBuilder:
    """Builds ``EngineSnapshot``s of one engine, in the thread that owns it (between steps).

    The adapters of waiting requests are counted, not walked: a census of the unfinished
    requests' adapters is kept up to date by whoever drives the engine (``entered`` when a
    request is added, ``left`` when it finishes or is aborted; ``resync`` rebuilds it from the
    engine's request table after anything else may have changed it). So one ``build`` costs:
    O(1) for the counters and sizes; one set union over the running sequences' block tables
    for ``kv_usage`` (the walk a scrape used to do, now once per step: the engine keeps no
    count of the blocks sequences hold); O(running) dictionary look-ups for the adapter
    counts (none while no unfinished request has an adapter); and the device tier's
    ``stats()``, which counts its pinned entries (O(resident adapters)).

    Invariant: between steps every unfinished sequence (``engine.seqs``) is running or
    waiting, so an adapter is a waiting sequence's if the unfinished sequences using it
    outnumber the running ones that do."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._keys: dict[str, frozenset[str]] = {}  # request id -> its adapters (if any)
        self._users: Counter[str] = Counter()  # adapter key -> unfinished requests using it
        self.resync()

    def entered(self, seq: Sequence) -> None:
        """``seq`` was added to the engine."""
        self.left(seq.request_id)  # an id the census still holds names a new request now
        keys = frozenset(seg.key for _, _, seg in seq.virtual)
        if keys:
            self._keys[seq.request_id] = keys
            self._users.update(keys)

    def left(self, request_id: str) -> None:
        """The request finished, failed or was aborted (idempotent; unknown ids are ignored)."""
        for key in self._keys.pop(request_id, ()):
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]

    def resync(self) -> None:
        """Recount from the engine's request table: O(unfinished requests). For what changed
        the engine outside ``entered``/``left`` (a ``Call``, a step that raised, a caller
        driving the engine itself)."""
        self._keys.clear()
        self._users.clear()
        for seq in self._engine.seqs.values():
            self.entered(seq)

    def build(self) -> EngineSnapshot:
        engine = self._engine
        sched, pool = engine.scheduler, engine.pool
        running = sched.running
        in_running: dict[str, int] = {}
        if self._users:
            for seq in running:
                for key in self._keys.get(seq.request_id, ()):
                    in_running[key] = in_running.get(key, 0) + 1
        only_running = sum(1 for k, n in in_running.items() if self._users[k] == n)
        held = set().union(*(seq.block_table for seq in running))
        stats = engine.stats
        return EngineSnapshot(
            running=len(running),
            waiting=sched.num_waiting(),
            kv_usage=len(held) / pool.num_blocks,
            kv_occupied=pool.usage(),
            free_blocks=pool.num_free,
            cached_blocks=engine.tree.num_cached_blocks,
            prompt_tokens=sched.prompt_tokens,
            cached_prompt_tokens=sched.cached_prompt_tokens,
            generation_tokens=stats.generated_tokens,
            computed_tokens=stats.computed_tokens,
            preemptions=sched.num_preemptions,
            share_preemptions=sched.num_share_preemptions,
            steps=stats.steps,
            failed_requests=stats.failed_requests,
            split_forwards=stats.split_forwards,
            adapters_running=len(in_running),
            adapters_waiting=len(self._users) - only_running,
            device_tier=engine.runner.adapter_tier.stats(),
        )
