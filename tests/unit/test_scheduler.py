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


def run_out(s: Scheduler, seqs: list[Sequence]) -> tuple[list[str], list[str]]:
    """Steps until every sequence is done, each stopped at its ``max_tokens``: the ids of the
    sequences preempted and of those finished, in order."""
    preempted: list[str] = []
    finished: list[str] = []
    while s.has_unfinished():
        out = step(s)
        preempted += [p.request_id for p in out.preempted]
        for q in seqs:
            if q.status == SeqStatus.RUNNING and len(q.output_ids) == q.params.max_tokens:
                s.finish(q, "length")
                finished.append(q.request_id)
        assert len(preempted) < 20, preempted
    return preempted, finished


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


def _four_seats_of_a(max_tokens=100):
    """Four seats, all taken by tenant a (6-token prompts: one full block each, cached)."""
    s, pool, tree = make(num_blocks=64, max_seqs=4, budget=64)
    a = [
        seq(f"a{i}", range(i * 10, i * 10 + 6), tenant="a", max_tokens=max_tokens) for i in range(4)
    ]
    for q in a:
        s.add(q)
    assert spans(step(s)) == [(f"a{i}", 0, 6) for i in range(4)]
    return s, pool, tree, a


def test_a_tenant_below_its_share_gets_a_seat_at_once():
    """a holds every seat with long generations; b's request is seated the next step: a's
    newest sequence is preempted (back to the front of a's queue), not counted as a lack of
    blocks, and later resumes from its cached block."""
    s, _, _, a = _four_seats_of_a()
    b0 = seq("b0", range(500, 503), tenant="b", max_tokens=2)
    s.add(b0)
    out = step(s)
    assert out.preempted == [a[3]]
    assert spans(out) == [("a0", 6, 7), ("a1", 6, 7), ("a2", 6, 7), ("b0", 0, 3)]
    assert a[3].status == SeqStatus.WAITING and a[3].block_table == []
    assert a[3].num_computed == 0 and a[3].key == list(range(30, 36)) + [99]
    assert list(s.waiting["a"]) == [a[3]]
    assert (s.num_share_preemptions, s.num_preemptions) == (1, 0)
    # b holds 1 seat and waits for nothing; a holds 3, above its share (2), but its waiting
    # sequence does not take a seat back from b.
    out = step(s)
    assert out.preempted == [] and spans(out) == [
        ("a0", 7, 8),
        ("a1", 7, 8),
        ("a2", 7, 8),
        ("b0", 3, 4),
    ]
    s.finish(b0, "length")
    # a3 takes the free seat again from its cached block: positions 4..7 are recomputed.
    out = step(s)
    assert out.preempted == [] and spans(out)[-1] == ("a3", 4, 7)
    assert a[3].num_cached_prompt == 0  # its first admission's figure (nothing cached), kept
    assert a[3].num_preemptions == 1 and a[3].output_ids == [99, 99]


def test_share_preemption_frees_one_seat_per_waiting_sequence_up_to_the_share():
    """b has three requests waiting; its share of four seats between two tenants is two: a's
    two newest go back to a's queue in their order, and a keeps its share."""
    s, _, _, a = _four_seats_of_a()
    b = [seq(f"b{i}", range(500 + 10 * i, 503 + 10 * i), tenant="b") for i in range(3)]
    for q in b:
        s.add(q)
    out = step(s)
    assert out.preempted == [a[3], a[2]]
    assert spans(out) == [("a0", 6, 7), ("a1", 6, 7), ("b0", 0, 3), ("b1", 0, 3)]
    assert list(s.waiting["a"]) == [a[2], a[3]] and list(s.waiting["b"]) == [b[2]]
    assert s.num_share_preemptions == 2
    out = step(s)  # both at their share: nobody is preempted for b2
    assert out.preempted == [] and [c.seq.request_id for c in out.chunks] == [
        "a0",
        "a1",
        "b0",
        "b1",
    ]


def test_no_share_preemption_for_one_tenant_or_a_waiting_sequence_that_cannot_start():
    """A tenant alone has every seat to itself. b's waiting sequence that needs the block b's
    running one is computing cannot start, so no seat is taken for it; one with its own
    prompt can, and gets one."""
    s, _, _, a = _four_seats_of_a()
    s.add(seq("a4", range(200, 203), tenant="a"))
    assert step(s).preempted == []

    s, _, _, a = _four_seats_of_a()
    s.finish(a[3], "length")
    shared = list(range(600, 612))
    b0 = seq("b0", shared, tenant="b")
    s.add(b0)
    s.config = SchedulerConfig(4, 5, BS)  # b0's prompt takes several steps
    assert spans(step(s)) == [("a0", 6, 7), ("a1", 6, 7), ("a2", 6, 7), ("b0", 0, 2)]
    s.add(seq("b1", [*shared, 700], tenant="b"))  # needs b0's blocks: waits for them
    out = step(s)
    assert out.preempted == [] and spans(out)[-1] == ("b0", 2, 4)
    s.add(seq("b2", range(800, 803), tenant="b"))  # its own prompt: can start now
    out = step(s)
    assert out.preempted == [a[2]]  # the token budget went to b0 this step: b2 starts next
    assert spans(out) == [("a0", 8, 9), ("a1", 8, 9), ("b0", 4, 7)]
    out = step(s)  # b0's prompt still takes the budget
    assert out.preempted == [] and spans(out) == [
        ("a0", 9, 10),
        ("a1", 9, 10),
        ("b0", 7, 10),
    ]
    s.config = SchedulerConfig(4, 64, BS)
    out = step(s)  # the seat a2 left is b2's
    assert out.preempted == [] and spans(out) == [
        ("a0", 10, 11),
        ("a1", 10, 11),
        ("b0", 10, 12),
        ("b2", 0, 3),
    ]
    assert s.num_share_preemptions == 1


def test_a_sequence_scoring_its_prompt_is_not_preempted_for_a_share():
    """Echo: its prompt has no cached logits to come back to, so share preemption skips it and
    takes the next newest of its tenant."""
    s, _, _ = make(num_blocks=64, max_seqs=2, budget=64)
    s.add(seq("a0", range(6), tenant="a"))
    echo = seq("a1", range(10, 16), tenant="a")
    echo.params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0)
    s.add(echo)
    s.config = SchedulerConfig(2, 8, BS)  # a1's prompt needs two steps
    assert spans(step(s)) == [("a0", 0, 6), ("a1", 0, 2)]
    assert echo.scores_prompt
    s.add(seq("b0", range(500, 503), tenant="b"))
    out = step(s)
    assert [p.request_id for p in out.preempted] == ["a0"]
    assert spans(out) == [("a1", 2, 6), ("b0", 0, 3)]


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


def test_a_tenant_filling_the_pool_gives_up_its_own_blocks():
    """Eight blocks. a's three sequences grow until the pool is full; b's one request, admitted
    last, is not the victim (before, as the newest of all, it was): a's newest sequences are,
    while a keeps its oldest. b0 is never preempted and everything finishes."""
    s, pool, _ = make(num_blocks=8)
    a = [seq(f"a{i}", range(i * 10, i * 10 + 7), tenant="a", max_tokens=20) for i in range(3)]
    b0 = seq("b0", range(500, 503), tenant="b", max_tokens=8)
    for q in a:
        s.add(q)
    step(s)
    s.add(b0)
    assert spans(step(s)) == [("a0", 7, 8), ("a1", 7, 8), ("a2", 7, 8), ("b0", 0, 3)]
    assert pool.num_free == 1
    out = step(s)  # a0 takes the free block; a1 needs one more: a2 goes
    assert out.preempted == [a[2]] and spans(out) == [("a0", 8, 9), ("a1", 8, 9), ("b0", 3, 4)]
    assert [q.block_table for q in a + [b0]] == [[0, 1, 7], [2, 3, 5], [], [6]]
    preempted, finished = run_out(s, a + [b0])
    preempted = ["a2", *preempted]
    # After b0 finishes, a's re-admitted sequences yield to a's older ones (a1 to a0, a2 to a1).
    assert preempted == ["a2", "a1", "a1", "a2"] and finished == ["b0", "a0", "a1", "a2"]
    assert b0.num_preemptions == 0 and a[0].num_preemptions == 0
    assert s.num_preemptions == len(preempted)
    assert all(q.output_ids == [99] * q.params.max_tokens for q in a + [b0])


def test_a_tenant_below_its_share_of_the_pool_gets_room_the_next_step():
    """Eight blocks, six held by a's three sequences (their next blocks still a step away);
    b's 12-token request needs three, two are free. Before, b waited until a's sequences
    needed blocks themselves; now, the step after admission found no room for it, a's newest
    goes back to its queue (a keeps more than its share, four) and b is admitted in that
    step; later, blocks run short only for a."""
    s, pool, _ = make(num_blocks=8)
    a = [seq(f"a{i}", range(i * 10, i * 10 + 6), tenant="a", max_tokens=20) for i in range(3)]
    for q in a:
        s.add(q)
    step(s)
    assert pool.num_free == 2
    b0 = seq("b0", range(500, 512), tenant="b", max_tokens=4)
    s.add(b0)
    out = step(s)  # no room for b0's three blocks
    assert out.preempted == [] and spans(out) == [("a0", 6, 7), ("a1", 6, 7), ("a2", 6, 7)]
    out = step(s)
    assert out.preempted == [a[2]]
    assert spans(out) == [("a0", 7, 8), ("a1", 7, 8), ("b0", 0, 12)]
    assert [q.block_table for q in a + [b0]] == [[0, 1], [2, 3], [], [6, 7, 5]]
    assert (s.num_share_preemptions, s.num_preemptions) == (1, 0)
    preempted, _ = run_out(s, a + [b0])
    assert b0.num_preemptions == 0 and a[0].num_preemptions == 0
    assert preempted == ["a1", "a2", "a1", "a2"] and s.num_share_preemptions == 1
    assert all(q.output_ids == [99] * q.params.max_tokens for q in a + [b0])


def test_a_long_prompt_shares_the_token_budget_with_another_tenant():
    """a's 200-token prompt is being computed in chunks of the whole 64-token budget when b's
    10-token request arrives. b is admitted in the next step: a's chunk is cut to its share
    (half the budget between two tenants), b takes 10, and the 22 b leaves go back to a. While
    b decodes, its token comes first and a's chunks keep to the share (the step stays short
    for b), and b is done before a's prompt is (before, b waited for a's whole prompt: a took
    64..128, 128..192, and b was admitted only in the step a's prompt ended)."""
    s, _, _ = make(num_blocks=128, budget=64)
    a0 = seq("a0", range(200), tenant="a", max_tokens=4)
    s.add(a0)
    assert spans(step(s)) == [("a0", 0, 64)]
    b0 = seq("b0", range(500, 510), tenant="b", max_tokens=4)
    s.add(b0)
    assert spans(step(s)) == [("a0", 64, 118), ("b0", 0, 10)]
    assert spans(step(s)) == [("b0", 10, 11), ("a0", 118, 150)]
    assert spans(step(s)) == [("b0", 11, 12), ("a0", 150, 182)]
    assert spans(step(s)) == [("b0", 12, 13), ("a0", 182, 200)]
    assert b0.output_ids == [99] * 4 and a0.output_ids == [99]


def test_one_tenants_prompts_take_the_whole_budget():
    """With no other tenant waiting or computing a prompt, nothing is cut: two of a's prompts
    share the budget in admission order, as before."""
    s, _, _ = make(num_blocks=128, budget=64)
    a0, a1 = seq("a0", range(100), tenant="a"), seq("a1", range(200, 300), tenant="a")
    s.add(a0)
    s.add(a1)
    assert spans(step(s)) == [("a0", 0, 64)]
    assert spans(step(s)) == [("a0", 64, 100), ("a1", 0, 28)]
    assert spans(step(s)) == [("a0", 100, 101), ("a1", 28, 91)]


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
