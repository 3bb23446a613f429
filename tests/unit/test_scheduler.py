"""Scheduler against a fake runner: budgets, caching, grouping, preemption, fairness."""

from __future__ import annotations

from server.engine.kv_cache import BlockPool
from server.engine.prefix_tree import PrefixTree
from server.engine.request import SamplingParams, SeqStatus, Sequence
from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

BS = 4


def make(num_blocks=16, max_seqs=8, budget=64):
    pool = BlockPool(num_blocks)
    tree = PrefixTree(BS, pool)
    return Scheduler(SchedulerConfig(max_seqs, budget, BS), pool, tree), pool, tree


_clock = iter(range(10_000))


def seq(rid, tokens, tenant="t", max_tokens=4):
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Sequence(rid, tenant, list(tokens), [], params, float(next(_clock)))


def step(s: Scheduler, token=99) -> SchedulerOutput:
    """One step with a fake runner that always samples ``token``."""
    out = s.schedule()
    s.update_from_output(out, [token for c in out.chunks if c.sample])
    return out


def spans(out):
    return [(c.seq.request_id, c.start, c.end) for c in out.chunks]


def test_token_budget_chunks_prefill_and_mixes_decode():
    s, pool, _ = make(budget=16)
    a, b = seq("a", range(10)), seq("b", range(100, 110))
    s.add(a)
    s.add(b)
    assert spans(step(s)) == [("a", 0, 10), ("b", 0, 6)]
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4]
    assert a.output_ids == [99] and b.output_ids == []
    # a decodes one token while b's prompt continues.
    assert spans(step(s)) == [("a", 10, 11), ("b", 6, 10)]
    assert b.block_table == [3, 4, 5] and b.output_ids == [99]
    assert spans(step(s)) == [("a", 11, 12), ("b", 10, 11)]
    assert pool.num_free == 16 - 6


def test_max_num_seqs_caps_running():
    s, _, _ = make(max_seqs=2)
    for r in "abc":
        s.add(seq(r, range(ord(r) * 10, ord(r) * 10 + 3)))
    assert [c.seq.request_id for c in step(s).chunks] == ["a", "b"]
    assert s.num_waiting() == 1
    # Queue time starts counting at arrival and stops at first admission.
    a, _b, c = s.running[0], s.running[1], s.waiting["t"][0]
    assert a.first_scheduled is not None and a.first_scheduled >= a.arrival
    assert c.first_scheduled is None


def test_shared_prefix_computed_once_then_hit():
    """b shares a's first two blocks: it waits while a computes them, then reuses them."""
    s, pool, _ = make()
    a = seq("a", list(range(8)) + [50, 51])
    b = seq("b", list(range(8)) + [60, 61, 62])
    s.add(a)
    s.add(b)
    assert spans(step(s)) == [("a", 0, 10)]
    out = step(s)
    assert spans(out) == [("a", 10, 11), ("b", 8, 11)]
    assert b.block_table[:2] == a.block_table[:2] == [0, 1]
    assert b.num_cached_prompt == 8
    assert s.prompt_tokens == 10 + 11 and s.cached_prompt_tokens == 8
    assert pool.refcount(0) == 3  # a, b and the tree


def test_other_tenant_gets_no_hit():
    s, _, _ = make()
    a = seq("a", range(8), tenant="acme")
    s.add(a)
    step(s)
    b = seq("b", range(8), tenant="globex")
    s.add(b)
    step(s)
    assert b.num_cached_prompt == 0
    c = seq("c", range(8), tenant="acme")
    s.add(c)
    step(s)
    # The last position is always recomputed, so 7 of 8 positions -> 1 whole block.
    assert c.num_cached_prompt == 4


def test_fair_share_admits_least_served_tenant_first():
    s, _, _ = make(max_seqs=3)
    for i in range(3):
        s.add(seq(f"a{i}", range(i * 10, i * 10 + 3), tenant="a"))
    s.add(seq("b0", range(500, 503), tenant="b"))
    assert [c.seq.request_id for c in step(s).chunks] == ["a0", "b0", "a1"]


def test_preemption_by_recompute_loses_nothing():
    """Six blocks; two sequences that each grow to four blocks cannot both fit: the later
    one is preempted (blocks freed, back to the front of the queue) and finishes later."""
    s, pool, tree = make(num_blocks=6)
    a = seq("a", range(7), max_tokens=9)
    b = seq("b", range(100, 107), max_tokens=9)
    s.add(a)
    s.add(b)
    preempted_at = None
    finished = []
    for i in range(40):
        out = step(s)
        if out.preempted and preempted_at is None:
            preempted_at = i
            assert [p.request_id for p in out.preempted] == ["b"]
            assert b.status == SeqStatus.WAITING and b.block_table == [] and b.num_computed == 0
        for q in (a, b):
            if q.status == SeqStatus.RUNNING and len(q.output_ids) >= 9:
                s.finish(q, "length")
                finished.append(q.request_id)
        if not s.has_unfinished():
            break
    assert preempted_at is not None
    assert finished == ["a", "b"]
    assert a.output_ids == [99] * 9 and b.output_ids == [99] * 9
    assert b.num_preemptions >= 1
    # Everything is back in the pool or held by the tree alone.
    assert pool.num_free + tree.num_cached_blocks == 6
    assert all(pool.refcount(x) == 1 for x in range(6) if pool.refcount(x))


def test_eviction_before_preemption():
    s, pool, tree = make(num_blocks=4)
    a = seq("a", range(8), max_tokens=1)
    s.add(a)
    step(s)
    s.finish(a, "length")
    assert tree.num_cached_blocks == 2 and pool.num_free == 2
    # b needs 3 blocks: a's cached node (blocks 0 and 1, one node) is evicted whole.
    b = seq("b", range(100, 112), max_tokens=1)
    s.add(b)
    out = step(s)
    assert spans(out) == [("b", 0, 12)] and out.preempted == []
    assert b.block_table == [2, 3, 0]
    assert tree.num_cached_blocks == 3 and pool.num_free == 1


def test_abort_frees_blocks():
    s, pool, _ = make()
    a = seq("a", range(6))
    s.add(a)
    step(s)
    s.finish(a, "abort")
    assert a.status == SeqStatus.FINISHED and a.finish_reason == "abort"
    assert pool.num_free == 16 - 1  # the one full block stays cached in the tree
    assert not s.has_unfinished()


def test_reserve_ahead_takes_free_blocks_for_every_sequence_or_none():
    """Several decode steps at once: blocks up to each end, all from free blocks, else
    nothing changes (no preemption, no cached block evicted)."""
    s, pool, tree = make(num_blocks=8)
    a, b = seq("a", range(6)), seq("b", range(100, 103))
    s.add(a)
    s.add(b)
    step(s)  # a: positions 0..5 in blocks [0, 1]; b: 0..2 in [2]; then each has 1 token more
    assert a.block_table == [0, 1] and b.block_table == [2]
    assert tree.num_cached_blocks == 1 and pool.num_free == 5
    # a to 13 positions: blocks for 8..12 -> 2 more; b to 7: 1 more.
    assert s.reserve_ahead([(a, 13), (b, 7)])
    assert a.block_table == [0, 1, 3, 4] and b.block_table == [2, 5]
    assert pool.num_free == 2
    # 3 blocks wanted, 2 free: nothing taken, the cached block stays.
    assert not s.reserve_ahead([(a, 24), (b, 9)])  # a: 2 more, b: 1 more
    assert a.block_table == [0, 1, 3, 4] and b.block_table == [2, 5]
    assert pool.num_free == 2 and tree.num_cached_blocks == 1
    # Already covered: nothing to take.
    assert s.reserve_ahead([(a, 16), (b, 8)]) and pool.num_free == 2
