"""Continuous batching over the block pool and the prefix tree. Never touches tensors.

Each step every running sequence gets its next chunk (one token when decoding, first; up to
the token budget while its prompt is being computed: chunked prefill mixed with decode), then
waiting sequences are admitted while seats, tokens and blocks remain. While a prompt is
being computed and two tenants or more have work (running, or waiting while a seat is free),
each tenant's running prompts take at most its share of the budget
(``fair_share.prompt_share``); what admission leaves goes back to them unless another tenant
is decoding: one tenant's long prompt does not hold another's request off for the steps it
takes, nor make each of its decode steps as slow as a whole budget of prompt. There is no
prefill or decode phase: a sequence only has ``num_computed`` positions of ``key``.

- Prefix caching: at admission the longest cached prefix of the key (in whole blocks, under
  the tenant's namespace) is taken from the tree; completed blocks are inserted as they fill.
  A sequence that scores its prompt (echo) takes nothing from the tree: it needs logits at
  every prompt position, and a cached block has none.
- Shared prefixes are computed once: a waiting sequence whose next block is being computed by
  a running one (a claim in the tree) waits for it, then finds it in the tree.
- Fair share: admission picks the tenant with the fewest running sequences first. When every
  seat is taken and a tenant that could start a waiting sequence holds fewer than its share
  (``max_num_seqs`` over the tenants running or waiting, rounded down), the newest sequences
  of tenants above their share are preempted (as below) to free one seat per such waiting
  sequence, up to the share: another tenant's request waits for a seat about a step (blocks
  and the token budget allowing), not until the long generations holding the seats end. A
  preempted sequence's full blocks stay in the prefix cache, so its recomputation is mostly
  cache hits. The pool is shared the same way: when admission finds no room for a sequence
  of a tenant holding fewer blocks than its share (the pool over the tenants running or
  waiting), sequences of tenants above their share are preempted at the start of the next
  step until it fits (``fair_share``).
  These count in ``num_share_preemptions``.
- Preemption by recompute: when blocks run out, unreferenced cached blocks are evicted first,
  then a sequence goes back to the front of its queue (its KV is dropped and recomputed
  later, mostly from the cache): the newest of the tenant holding the most blocks, each
  tenant keeping its oldest running sequence (``fair_share.memory_victim``). No request is
  dropped.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from server.engine import fair_share
from server.engine.batch import BatchPlan, Chunk, build_plan
from server.engine.kv_cache import BlockPool
from server.engine.prefix_tree import PrefixTree
from server.engine.request import SeqStatus, Sequence

# Waiting sequences of one tenant looked at per admission: past the first that can start, a
# sequence waiting for another's shared block must not hold the others back, but scanning
# thousands each step would cost more than a step.
WAITING_SCAN = 64


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    block_size: int = 16


@dataclass
class SchedulerOutput:
    """One step's decision: the chunks to compute (``plan``: the same, laid out for the
    forward, with their shared-prefix groups) and the sequences preempted to make room."""

    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    plan: BatchPlan | None = None

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, tree: PrefixTree) -> None:
        self.config = config
        self.pool = pool
        self.tree = tree
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # for lack of blocks
        self.num_share_preemptions = 0  # to seat a tenant below its share of seats or blocks
        self.prompt_tokens = 0  # positions of first-admitted prompts, virtual tokens included
        self.cached_prompt_tokens = 0  # of those, taken from the prefix cache
        # The tenant and block count of the sequence the last admission had no room for.
        self._short: tuple[str, int] | None = None

    # Queue --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.setdefault(seq.tenant, deque()).append(seq)

    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting() > 0

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop ``seq`` (finished or aborted) and release its blocks."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            queue = self.waiting.get(seq.tenant)
            if queue is not None and seq in queue:
                queue.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    # One step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._give_way(out)
        seated = len(out.preempted)
        # Decoding sequences first (one token each), then prompts: a long prompt's chunk never
        # takes another running sequence's next token.
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1)
        waiting, seats = self.waiting, self.config.max_num_seqs
        share = fair_share.prompt_share(
            self.running, waiting, seats, budget, self.config.block_size
        )
        used: Counter[str] = Counter()  # prompt tokens given to each tenant this step
        cut: list[Sequence] = []  # prompts given less than the budget allowed, for their share
        for i, seq in enumerate(order):
            if budget == 0:
                break
            if seq.status != SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            remaining = seq.num_tokens - seq.num_computed
            n = min(remaining, budget)
            if remaining > 1:
                if n > share - used[seq.tenant]:
                    cut.append(seq)
                    n = share - used[seq.tenant]
                if n < 1:  # this tenant's prompts have had their share of the step
                    continue
                used[seq.tenant] += n
            if not self._reserve_running(seq, seq.num_computed + n, out, order[i:]):
                continue
            out.chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        if len(out.preempted) == seated:  # no sequence lacked blocks: room to admit
            budget = self._admit(out, budget)
        if budget and cut and not fair_share.others_decoding(self.running, cut):
            self._give_leftover(out, cut, budget)
        if out.chunks:
            out.plan = build_plan(out.chunks, self.config.block_size)
        return out

    def _give_leftover(self, out: SchedulerOutput, cut: list[Sequence], budget: int) -> None:
        """The step's unused budget to the prompts that the share cut, in order, from free
        and evictable blocks only (nobody is preempted after admission)."""
        at = {id(c.seq): i for i, c in enumerate(out.chunks)}
        for seq in cut:
            if budget == 0:
                return
            if seq.status != SeqStatus.RUNNING:
                continue
            i = at.get(id(seq))
            start = out.chunks[i].start if i is not None else seq.num_computed
            end = out.chunks[i].end if i is not None else seq.num_computed
            more = min(seq.num_tokens - end, budget)
            need = self._blocks_needed(seq, end + more)
            if more < 1 or not self._ensure_free(need):
                continue
            seq.block_table.extend(self.pool.allocate(need))
            chunk = Chunk(seq, start, end + more)
            if i is None:
                out.chunks.append(chunk)
            else:
                out.chunks[i] = chunk
            budget -= more

    def update_from_output(self, out: SchedulerOutput, sampled: list[int]) -> None:
        """Advance each chunk's sequence, cache its completed blocks, append sampled tokens
        (``sampled`` holds one token per chunk with ``sample`` set, in order)."""
        tokens = iter(sampled)
        bs = self.config.block_size
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed = chunk.end
            full = chunk.end // bs
            if full > chunk.start // bs:
                self.tree.insert(seq.namespace, seq.key[: full * bs], seq.block_table[:full])
            if seq.num_computed >= seq.num_tokens:
                self.tree.release(seq.request_id)
            if chunk.sample:
                tok = next(tokens)
                seq.key.append(tok)
                seq.output_ids.append(tok)
        assert next(tokens, None) is None, "more sampled tokens than sampling chunks"

    def reserve_ahead(self, ends: list[tuple[Sequence, int]]) -> bool:
        """Blocks for each running sequence's positions up to ``end`` (several decode steps
        run at once), from free blocks only: all of them, or none and False. Nobody is
        preempted and no cached block evicted for positions that may never be kept."""
        need = [self._blocks_needed(seq, end) for seq, end in ends]
        if sum(need) > self.pool.num_free:
            return False
        for (seq, _), n in zip(ends, need, strict=True):
            if n:
                seq.block_table.extend(self.pool.allocate(n))
        return True

    # Internals ----------------------------------------------------------------------------
    def _reserve_running(
        self, seq: Sequence, end: int, out: SchedulerOutput, rest: list[Sequence]
    ) -> bool:
        """Give ``seq`` blocks up to position ``end``, preempting sequences of ``rest`` (``seq``
        and those not yet given a chunk this step) if needed. False if ``seq`` itself had to be
        preempted."""
        need = self._blocks_needed(seq, end)
        while not self._ensure_free(need):
            victim = fair_share.memory_victim(self.running, rest)
            self._preempt(victim, out)
            self.num_preemptions += 1
            if victim is seq:
                return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def _blocks_needed(self, seq: Sequence, end: int) -> int:
        bs = self.config.block_size
        return max(0, -(-end // bs) - len(seq.block_table))

    def _ensure_free(self, need: int) -> bool:
        if self.pool.num_free < need:
            self.tree.evict(need - self.pool.num_free)
        return self.pool.num_free >= need

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.setdefault(seq.tenant, deque()).appendleft(seq)
        out.preempted.append(seq)

    def _give_way(self, out: SchedulerOutput) -> None:
        """Preempt what the fair shares ask (``fair_share``): sequences of tenants above their
        share of the seats, for waiting sequences of tenants below it that could start now;
        then, when the last admission found no room for a sequence of a tenant below its share
        of the KV pool, sequences of tenants above theirs until it fits."""
        seats = self.config.max_num_seqs
        victims = fair_share.seat_victims(self.running, self.waiting, seats, self._startable)
        for seq in victims:
            self._preempt(seq, out)
        short, self._short = self._short, None
        if short is not None:
            tenant, need = short
            blocks = fair_share.block_victims(
                self.running, self.waiting, self.pool.num_blocks, tenant, need
            )
            victims.extend(blocks)
            for seq in blocks:
                self._preempt(seq, out)
        self.num_share_preemptions += len(victims)

    def _startable(self, queue: deque[Sequence]) -> bool:
        """Whether admission could start one of ``queue``'s first sequences now (not all
        waiting for a shared block another sequence is computing)."""
        return any(self._match(seq) is not None for seq in list(queue)[:WAITING_SCAN])

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.decref(seq.block_table)
            seq.block_table = []
        self.tree.release(seq.request_id)

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Start waiting sequences while seats, ``budget`` tokens and blocks remain; returns
        the budget left."""
        skipped: set[str] = set()
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            picked = self._pick_waiting(skipped)
            if picked is None:
                return budget
            seq, cached = picked
            n = min(seq.num_tokens - len(cached) * self.config.block_size, budget)
            start = len(cached) * self.config.block_size
            self.pool.incref(cached)  # ours before anything can evict them
            seq.block_table = list(cached)
            need = self._blocks_needed(seq, start + n)
            if not self._ensure_free(need):
                self.pool.decref(cached)
                seq.block_table = []
                self._short = (seq.tenant, need)  # for the next step's fair_share.block_victims
                return budget
            seq.block_table.extend(self.pool.allocate(need))
            self.waiting[seq.tenant].remove(seq)
            if seq.num_preemptions == 0:
                seq.first_scheduled = time.monotonic()
                seq.num_cached_prompt = min(start, seq.num_prompt)
                self.prompt_tokens += seq.num_prompt
                self.cached_prompt_tokens += seq.num_cached_prompt
            seq.num_computed = start
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.tree.claim(seq.namespace, seq.key, len(cached), seq.request_id)
            out.chunks.append(Chunk(seq, start, start + n))
            budget -= n
        return budget

    def _pick_waiting(self, skipped: set[str]) -> tuple[Sequence, list[int]] | None:
        """The next sequence to admit: tenants with the fewest running sequences first (then
        the oldest head); within a tenant the oldest (of the first ``WAITING_SCAN``) that is
        not waiting for a shared block another sequence is computing. Returns it with its
        cached blocks."""
        running = Counter(s.tenant for s in self.running)
        while True:
            tenants = [t for t, q in self.waiting.items() if q and t not in skipped]
            if not tenants:
                return None
            tenant = min(tenants, key=lambda t: (running[t], self.waiting[t][0].arrival))
            for seq in list(self.waiting[tenant])[:WAITING_SCAN]:
                cached = self._match(seq)
                if cached is not None:
                    return seq, cached
            skipped.add(tenant)

    def _match(self, seq: Sequence) -> list[int] | None:
        """The cached blocks ``seq`` can start from, or None while another sequence is
        computing its next block (it will find it cached then)."""
        bs = self.config.block_size
        if seq.scores_prompt:
            # Echo: every prompt position's logits are needed, and cached blocks have none, so
            # the whole prompt is computed here (its blocks still enter the cache for others).
            return []
        blocks = self.tree.match(seq.namespace, seq.key).blocks
        # Keep at least the last position to compute: its logits choose the next token.
        blocks = blocks[: (seq.num_tokens - 1) // bs]
        owner = self.tree.claimant(seq.namespace, seq.key, len(blocks))
        return None if owner not in (None, seq.request_id) else blocks
