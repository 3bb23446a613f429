"""Who gives way when tenants compete for seats, KV blocks or the token budget.

The scheduler (``scheduler.py``) owns the queues and carries out preemptions; these functions
only decide, over its plain data: the running sequences in admission order (oldest first) and
the waiting queues by tenant. Each decision follows one rule: a tenant above its share gives
way to a tenant below it, newest sequence first, and every tenant keeps its oldest running
sequence, so each one keeps making progress.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable

from server.engine.request import SeqStatus, Sequence


def blocks_by_tenant(running: Iterable[Sequence]) -> dict[str, set[int]]:
    """The distinct blocks each tenant's running sequences hold (shared ones count once)."""
    blocks: dict[str, set[int]] = {}
    for s in running:
        blocks.setdefault(s.tenant, set()).update(s.block_table)
    return blocks


def oldest_by_tenant(running: Iterable[Sequence]) -> dict[str, Sequence]:
    """Each tenant's earliest admitted running sequence."""
    oldest: dict[str, Sequence] = {}
    for s in running:
        oldest.setdefault(s.tenant, s)
    return oldest


def memory_victim(running: list[Sequence], rest: list[Sequence]) -> Sequence:
    """The sequence to preempt when a running sequence lacks blocks: of ``rest`` (it and the
    sequences not yet given a chunk this step), the newest of the tenant that holds the most
    blocks, leaving every tenant its oldest running sequence; the newest of them all when each
    is its tenant's oldest. So a tenant whose many long sequences fill the pool gives up its
    own blocks rather than another tenant's one request."""
    oldest, blocks = oldest_by_tenant(running), blocks_by_tenant(running)
    pending = {id(s) for s in rest if s.status == SeqStatus.RUNNING}
    later = [s for s in reversed(running) if id(s) in pending]  # newest first
    candidates = [s for s in later if oldest[s.tenant] is not s]
    # max keeps the first of equals: the newest candidate of the tenant holding the most
    return max(candidates, key=lambda s: len(blocks[s.tenant]), default=later[0])


def seat_victims(
    running: list[Sequence],
    waiting: dict[str, deque[Sequence]],
    seats: int,
    startable: Callable[[deque[Sequence]], bool],
) -> list[Sequence]:
    """With all ``seats`` taken, the sequences to preempt so that tenants below their share
    (the seats over the tenants running or waiting, rounded down) can start the waiting
    sequences ``startable`` says they could: one per such sequence, up to the share, each the
    newest of a tenant above its share. Victims keep at least their share; sequences scoring
    their prompt (echo: nothing to take from the cache) are not preempted for this."""
    queued = {t: q for t, q in waiting.items() if q}
    if len(running) < seats or not queued:
        return []
    count = Counter(s.tenant for s in running)
    share = max(1, seats // len(count.keys() | queued.keys()))
    wanted = sum(
        min(share - count[t], len(q))
        for t, q in queued.items()
        if count[t] < share and startable(q)
    )
    victims: list[Sequence] = []
    for seq in reversed(running):  # newest first
        if len(victims) == wanted:
            break
        if count[seq.tenant] > share and not seq.scores_prompt:
            victims.append(seq)
            count[seq.tenant] -= 1
    return victims


def block_victims(
    running: list[Sequence],
    waiting: dict[str, deque[Sequence]],
    num_blocks: int,
    tenant: str,
    need: int,
) -> list[Sequence]:
    """``tenant``'s waiting sequence found no room for its ``need`` blocks: if the tenant holds
    fewer blocks than its share (the pool's ``num_blocks`` over the tenants running or
    waiting), the sequences to preempt, in order, until the blocks no running sequence holds
    would fit it. Each is the newest of the tenant holding the most, every tenant keeping its
    oldest running sequence (and sequences scoring their prompt, which have nothing cached to
    resume from). Blocks no running sequence holds are free or cached and unreferenced:
    admission frees them by eviction."""
    if not waiting.get(tenant):
        return []
    queued = {t for t, q in waiting.items() if q}
    left = list(running)
    blocks = blocks_by_tenant(left)
    share = num_blocks // len(blocks.keys() | queued)
    victims: list[Sequence] = []
    while (
        len(blocks.get(tenant, ())) < share
        and num_blocks - len(set().union(*blocks.values())) < need
    ):
        oldest = oldest_by_tenant(left)
        candidates = [
            s
            for s in reversed(left)
            if len(blocks[s.tenant]) > share and oldest[s.tenant] is not s and not s.scores_prompt
        ]
        if not candidates:
            break
        victim = max(candidates, key=lambda s: len(blocks[s.tenant]))
        victims.append(victim)
        left.remove(victim)
        blocks = blocks_by_tenant(left)
    return victims


def prompt_share(
    running: list[Sequence],
    waiting: dict[str, deque[Sequence]],
    seats: int,
    budget: int,
    floor: int,
) -> int:
    """The most prompt tokens (chunked prefill, recomputation) one tenant's running sequences
    take in a step: the whole ``budget`` when one tenant has work, else the budget over the
    tenants with a running sequence or, while a seat is free, a waiting one (at least
    ``floor``, a block). So one tenant's long prompt neither holds another's request off for
    the steps it takes nor makes each of another tenant's decode steps as slow as a whole
    budget of prompt."""
    if all(s.num_tokens - s.num_computed <= 1 for s in running):
        return budget  # no running prompt to cut
    tenants = {s.tenant for s in running}
    if len(running) < seats:
        tenants |= {t for t, q in waiting.items() if q}
    if len(tenants) < 2:
        return budget
    return max(floor, budget // len(tenants))


def others_decoding(running: Iterable[Sequence], cut: list[Sequence]) -> bool:
    """Whether a tenant other than those of the ``cut`` prompts has a sequence decoding this
    step: then what the step's budget has left is not spent on the prompts, which would make
    the step, and that tenant's next token, as slow as an uncut chunk."""
    prompts = {s.tenant for s in cut}
    return any(s.tenant not in prompts and s.num_tokens - s.num_computed == 1 for s in running)
