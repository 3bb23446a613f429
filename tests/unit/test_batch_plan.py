"""The step plan (``server.engine.batch``) and its flat arrays (``server.engine.flat``), built by
the scheduler from a real pool and prefix tree: exact rows, positions, slots, block tables and
shared-prefix groups. None of it needs torch, which a fresh interpreter shows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from server.engine.batch import EmbeddingSpan, PrefixCopy, SharedGroup
from server.engine.flat import flatten
from server.engine.kv_cache import BlockPool
from server.engine.prefix_tree import PrefixTree
from server.engine.request import AdapterSegment, SamplingParams, Sequence
from server.engine.scheduler import Scheduler, SchedulerConfig

BS = 4


def make(num_blocks=32, budget=64):
    pool = BlockPool(num_blocks)
    tree = PrefixTree(BS, pool)
    return Scheduler(SchedulerConfig(8, budget, BS), pool, tree)


def seq(rid, key, virtual=(), tenant="t"):
    params = SamplingParams(max_tokens=4, temperature=0)
    return Sequence(rid, tenant, list(key), list(virtual), params, 0.0)


def test_the_plan_needs_no_torch():
    code = (
        "import sys\n"
        "import server.engine.scheduler, server.engine.fair_share, server.engine.batch\n"
        "import server.engine.flat\n"
        "import server.engine.prefix_tree, server.engine.kv_cache, server.engine.request\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_rows_positions_and_slots_with_adapters_of_both_kinds():
    """A prefix-tuning segment (3 virtual tokens) then a soft prompt (2) then 4 tokens: the
    prefix-tuning positions are copied, not rows; the soft prompt's are rows fed embeddings."""
    prefix = AdapterSegment("p", "prefix_tuning", 3)
    soft = AdapterSegment("s", "prompt_tuning", 2)
    key = [("p", 0), ("p", 1), ("p", 2), ("s", 0), ("s", 1), 10, 11, 12, 13]
    a = seq("a", key, [(0, 3, prefix), (3, 5, soft)])
    b = seq("b", [20, 21, 22])
    s = make()
    s.add(a)
    s.add(b)
    out = s.schedule()
    plan = out.plan
    assert [(c.seq.request_id, c.start, c.end) for c in plan.chunks] == [("a", 0, 9), ("b", 0, 3)]
    assert plan.row_starts == (0, 6, 9)
    assert plan.positions == (3, 4, 5, 6, 7, 8, 0, 1, 2)
    assert plan.token_ids == (0, 0, 10, 11, 12, 13, 20, 21, 22)
    assert plan.prefix_copies == (PrefixCopy(0, prefix, 0, 0, 3),)
    assert plan.embedding_spans == (EmbeddingSpan(0, soft, 0, 2),)
    assert plan.block_tables == ((0, 1, 2), (3,))
    assert plan.sample_rows == [5, 8]
    flat = flatten(plan)
    assert flat.slot_mapping.tolist() == [3, 4, 5, 6, 7, 8, 12, 13, 14]
    assert flat.chunk_of_row.tolist() == [0] * 6 + [1] * 3
    assert flat.slots(0, 0, 3).tolist() == [0, 1, 2]
    assert flat.block_tables.tolist() == [[0, 1, 2], [3, 0, 0]]
    assert plan.groups == () and flat.suffix_starts.tolist() == [0, 0]


def test_groups_come_from_the_tree_and_cover_only_cached_blocks():
    """Three sequences on one 8-token system prompt: the first computes it, the other two wait
    for it (a claim in the tree), then share its two blocks with the first one's decode."""
    system = list(range(100, 108))
    s = make()
    seqs = [seq(r, system + q) for r, q in (("a", [1, 2]), ("b", [3, 4, 5]), ("c", [6]))]
    for x in seqs:
        s.add(x)
    first = s.schedule()
    assert [(c.seq.request_id, c.start, c.end) for c in first.chunks] == [("a", 0, 10)]
    assert s.tree.claimant(("t",), seqs[1].key, 1) == "a"
    s.update_from_output(first, [50])
    second = s.schedule()
    plan = second.plan
    spans = [(c.seq.request_id, c.start, c.end) for c in plan.chunks]
    assert spans == [("a", 10, 11), ("b", 8, 11), ("c", 8, 9)]
    assert plan.block_tables == ((0, 1, 2), (0, 1, 3), (0, 1, 4))
    assert plan.groups == (SharedGroup(2, (0, 1, 2)),)
    assert plan.group_of == (0, 0, 0)
    flat = flatten(plan)
    assert flat.suffix_starts.tolist() == [8, 8, 8]
    assert flat.group_blocks.tolist() == [2] and flat.group_first.tolist() == [0]
    assert flat.rows_per_chunk.tolist() == [1, 3, 1]
    assert s.tree.claimant(("t",), seqs[1].key, 1) is None  # a computed it: released


def test_subset_rebuilds_rows_and_groups():
    system = list(range(100, 108))
    s = make()
    for r, q in (("a", [1]), ("b", [2]), ("c", [3])):
        s.add(seq(r, system + q))
    s.update_from_output(s.schedule(), [7])
    plan = s.schedule().plan
    assert plan.groups == (SharedGroup(2, (0, 1, 2)),)
    part = plan.subset([2])
    assert [c.seq.request_id for c in part.chunks] == ["c"]
    assert part.groups == () and part.group_of == (-1,) and part.row_starts == (0, 1)
    np.testing.assert_array_equal(flatten(part).positions, [8])
