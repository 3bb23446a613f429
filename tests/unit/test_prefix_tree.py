from __future__ import annotations

import pytest

from server.engine.kv_cache import BlockPool
from server.engine.prefix_tree import InsertResult, MatchResult, PrefixTree

NS = ("tenant-a",)


def make(num_blocks: int = 16, block_size: int = 2) -> tuple[BlockPool, PrefixTree]:
    pool = BlockPool(num_blocks)
    return pool, PrefixTree(block_size, pool)


def cache(pool: BlockPool, tree: PrefixTree, key: list, ns: object = NS) -> list[int]:
    """Run a finished sequence over `key`: fresh blocks for the whole key, insert, release the
    sequence's own reference. Returns the sequence's blocks."""
    blocks = pool.allocate(len(key) // tree.block_size)
    tree.insert(ns, key, blocks)
    pool.decref(blocks)
    return blocks


def refs(pool: BlockPool) -> list[int]:
    return [pool.refcount(i) for i in range(pool.num_blocks)]


def test_insert_then_match_exact_blocks() -> None:
    pool, tree = make(8)
    blocks = pool.allocate(3)
    assert tree.insert(NS, [1, 2, 3, 4, 5, 6], blocks) == InsertResult(0, 6)
    assert refs(pool) == [2, 2, 2, 0, 0, 0, 0, 0]
    assert tree.num_cached_blocks == 3
    assert tree.match(NS, [1, 2, 3, 4, 5, 6]) == MatchResult([0, 1, 2], 6)
    assert tree.match(NS, [1, 2, 3, 4]) == MatchResult([0, 1], 4)
    assert tree.match(NS, [1, 2, 9, 9]) == MatchResult([0], 2)
    assert tree.match(NS, [9, 9]) == MatchResult([], 0)
    assert tree.match(NS, []) == MatchResult([], 0)
    assert refs(pool) == [2, 2, 2, 0, 0, 0, 0, 0]  # match never changes ref counts


def test_partial_block_tail_is_ignored_by_match() -> None:
    pool, tree = make(8)
    cache(pool, tree, [1, 2, 3, 4])
    assert tree.match(NS, [1, 2, 3, 4, 5]) == MatchResult([0, 1], 4)
    assert tree.match(NS, [1, 2, 3]) == MatchResult([0], 2)
    assert tree.match(NS, [1]) == MatchResult([], 0)


def test_insert_rejects_partial_blocks_and_wrong_block_count() -> None:
    pool, tree = make(8)
    blocks = pool.allocate(2)
    with pytest.raises(AssertionError):
        tree.insert(NS, [1, 2, 3], blocks)
    with pytest.raises(AssertionError):
        tree.insert(NS, [1, 2, 3, 4, 5, 6], blocks)
    assert tree.num_cached_blocks == 0
    assert refs(pool)[:2] == [1, 1]


def test_namespaces_are_isolated() -> None:
    pool, tree = make(8)
    a = cache(pool, tree, [1, 2, 3, 4], ns=("a",))
    b = cache(pool, tree, [1, 2, 3, 4], ns=("b",))
    assert (a, b) == ([0, 1], [2, 3])
    assert tree.match(("a",), [1, 2, 3, 4]) == MatchResult([0, 1], 4)
    assert tree.match(("b",), [1, 2, 3, 4]) == MatchResult([2, 3], 4)
    assert tree.match(("c",), [1, 2, 3, 4]) == MatchResult([], 0)
    assert tree.num_cached_blocks == 4


def test_match_splits_node_and_divergent_insert_makes_sibling() -> None:
    pool, tree = make(8)
    a, b, c, d, e, f, x, y = "abcdefxy"
    assert cache(pool, tree, [a, b, c, d, e, f]) == [0, 1, 2]  # clock 1
    assert tree.match(NS, [a, b, c, d, x, y]) == MatchResult([0, 1], 4)  # clock 2, split at 4
    seq = pool.allocate(3)
    assert seq == [3, 4, 5]
    assert tree.insert(NS, [a, b, c, d, x, y], seq) == InsertResult(4, 2)  # clock 3
    # The tree took only the new tail block; the caller's duplicates of [a b c d] stay its own.
    assert refs(pool) == [1, 1, 1, 1, 1, 2, 0, 0]
    pool.decref(seq)
    assert refs(pool) == [1, 1, 1, 0, 0, 1, 0, 0]
    assert tree.num_cached_blocks == 4
    assert tree.match(NS, [a, b, c, d, e, f]) == MatchResult([0, 1, 2], 6)  # clock 4
    assert tree.match(NS, [a, b, c, d, x, y]) == MatchResult([0, 1, 5], 6)  # clock 5
    # Three nodes: head [0 1] with leaves [2] (used at 4) and [5] (used at 5).
    assert tree.evict(1) == [2]
    assert tree.evict(1) == [5]
    assert tree.evict(1) == [0, 1]
    assert tree.num_cached_blocks == 0


def test_insert_splits_inside_an_edge() -> None:
    pool, tree = make(8)
    assert cache(pool, tree, [1, 2, 3, 4, 5, 6]) == [0, 1, 2]
    seq = pool.allocate(2)
    assert tree.insert(NS, [1, 2, 7, 8], seq) == InsertResult(2, 2)
    pool.decref(seq)
    assert seq == [3, 4]
    assert refs(pool) == [1, 1, 1, 0, 1, 0, 0, 0]
    assert tree.match(NS, [1, 2, 7, 8]) == MatchResult([0, 4], 4)
    assert tree.match(NS, [1, 2, 3, 4, 5, 6]) == MatchResult([0, 1, 2], 6)
    # Leaves [4] (last used at the first match) and [1 2] go before the shared head [0].
    assert tree.evict(1) == [4]
    assert tree.evict(1) == [1, 2]
    assert tree.evict(1) == [0]


def test_match_ending_inside_edge_lets_the_tail_be_evicted_alone() -> None:
    pool, tree = make(8)
    cache(pool, tree, [1, 2, 3, 4, 5, 6])
    assert tree.match(NS, [1, 2, 3, 4]) == MatchResult([0, 1], 4)
    assert tree.num_evictable_blocks() == 3
    assert tree.evict(1) == [2]
    assert tree.match(NS, [1, 2, 3, 4, 5, 6]) == MatchResult([0, 1], 4)


def test_insert_of_cached_prefix_does_not_take_callers_blocks() -> None:
    pool, tree = make(8)
    first = pool.allocate(2)
    assert tree.insert(NS, [1, 2, 3, 4], first) == InsertResult(0, 4)
    dup = pool.allocate(2)
    assert tree.insert(NS, [1, 2, 3, 4], dup) == InsertResult(4, 0)
    assert tree.insert(NS, [1, 2], dup[:1]) == InsertResult(2, 0)
    assert (first, dup) == ([0, 1], [2, 3])
    assert refs(pool) == [2, 2, 1, 1, 0, 0, 0, 0]
    assert tree.num_cached_blocks == 2
    assert pool.decref(dup) == [2, 3]
    assert tree.match(NS, [1, 2, 3, 4]) == MatchResult([0, 1], 4)


def test_insert_extending_a_cached_key_adds_one_node() -> None:
    pool, tree = make(8)
    cache(pool, tree, [1, 2])
    seq = tree.match(NS, [1, 2, 3, 4]).blocks + pool.allocate(1)
    pool.incref(seq[:1])  # the sequence's reference on the shared block
    assert seq == [0, 1]
    assert tree.insert(NS, [1, 2, 3, 4], seq) == InsertResult(2, 2)
    assert refs(pool)[:2] == [2, 2]
    assert tree.num_evictable_blocks() == 0
    pool.decref(seq)
    assert tree.num_evictable_blocks() == 2
    assert tree.evict(1) == [1]
    assert tree.evict(1) == [0]


def test_eviction_is_lru_and_match_refreshes() -> None:
    pool, tree = make(12)
    assert cache(pool, tree, [1, 1, 1, 1]) == [0, 1]
    assert cache(pool, tree, [2, 2, 2, 2]) == [2, 3]
    assert cache(pool, tree, [3, 3, 3, 3]) == [4, 5]
    assert tree.match(NS, [1, 1, 9, 9]) == MatchResult([0], 2)  # refreshes [1 1] only
    # The split left [1 1 | 1 1]: its tail is the oldest leaf now.
    assert tree.evict(1) == [1]
    assert tree.evict(2) == [2, 3]
    assert tree.evict(2) == [4, 5]
    assert tree.evict(2) == [0]
    assert tree.evict(2) == []
    assert pool.num_free == 12


def test_match_refreshes_a_whole_branch() -> None:
    pool, tree = make(12)
    assert cache(pool, tree, [1, 1, 1, 1]) == [0, 1]
    assert cache(pool, tree, [2, 2, 2, 2]) == [2, 3]
    assert cache(pool, tree, [3, 3, 3, 3]) == [4, 5]
    assert tree.match(NS, [1, 1, 1, 1, 7]) == MatchResult([0, 1], 4)
    assert tree.evict(1) == [2, 3]
    assert tree.insert(NS, [2, 2], pool.allocate(1)) == InsertResult(0, 2)  # new [2 2] is block 6
    assert tree.evict(1) == [4, 5]
    assert tree.evict(1) == [0, 1]
    assert tree.evict(1) == []  # block 6 is still held by the caller that inserted it


def test_evict_frees_whole_nodes_and_stops_once_enough() -> None:
    pool, tree = make(12)
    cache(pool, tree, [1, 1, 1, 1, 1, 1])
    cache(pool, tree, [2, 2, 2, 2])
    assert tree.evict(2) == [0, 1, 2]
    assert tree.num_cached_blocks == 2
    assert tree.evict(10) == [3, 4]


def test_referenced_node_is_never_evicted() -> None:
    pool, tree = make(12)
    held = pool.allocate(2)  # a running sequence keeps its blocks
    tree.insert(NS, [1, 1, 1, 1], held)
    cache(pool, tree, [2, 2, 2, 2])
    assert tree.num_evictable_blocks() == 2
    assert tree.evict(10) == [2, 3]
    assert tree.evict(10) == []
    assert tree.match(NS, [1, 1, 1, 1]) == MatchResult([0, 1], 4)
    assert refs(pool)[:2] == [2, 2]
    pool.decref(held)
    assert tree.num_evictable_blocks() == 2
    assert tree.evict(10) == [0, 1]


def test_referenced_child_pins_its_parent_until_released() -> None:
    pool, tree = make(12)
    cache(pool, tree, [1, 2, 3, 4])  # [0 1]
    head = tree.match(NS, [1, 2, 3, 4, 5, 6]).blocks
    pool.incref(head)
    seq = head + pool.allocate(1)
    assert tree.insert(NS, [1, 2, 3, 4, 5, 6], seq) == InsertResult(4, 2)
    cache(pool, tree, [1, 2, 3, 4, 7, 8])  # got [3 4 5]: 3, 4 duplicates freed, leaf [5]
    assert refs(pool)[:6] == [2, 2, 2, 0, 0, 1]
    assert tree.num_evictable_blocks() == 1
    assert tree.evict(10) == [5]
    pool.decref(seq)
    assert tree.num_evictable_blocks() == 3
    assert tree.evict(10) == [2, 0, 1]


def test_parent_becomes_candidate_in_lru_order() -> None:
    pool, tree = make(12)
    cache(pool, tree, [1, 2, 3, 4])  # P = [0 1], clock 1
    cache(pool, tree, [1, 2, 3, 4, 5, 6])  # C = [4] under P, clock 2 (dup blocks 2, 3 freed)
    cache(pool, tree, [9, 9])  # Q = [5], clock 3
    assert tree.num_evictable_blocks() == 4
    # P is only a leaf once C is gone, yet it is older than Q so it goes next.
    assert tree.evict(1) == [4]
    assert tree.evict(1) == [0, 1]
    assert tree.evict(1) == [5]


def test_num_evictable_blocks_counts_unpinned_subtrees_only() -> None:
    pool, tree = make(16)
    cache(pool, tree, [1, 1])  # [0]
    cache(pool, tree, [1, 1, 2, 2, 3, 3])  # got [1 2 3]: 1 is a duplicate, tail [2 3]
    held = pool.allocate(1)
    assert held == [4]
    tree.insert(NS, [4, 4], held)
    cache(pool, tree, [5, 5, 6, 6], ns=("other",))  # [5 6]
    assert tree.num_cached_blocks == 6
    assert tree.num_evictable_blocks() == 5
    pool.incref([3])  # a sequence holds part of the [2 3] node: it and its parent are pinned
    assert tree.num_evictable_blocks() == 2
    assert tree.evict(16) == [5, 6]
    assert tree.num_cached_blocks == 4


def test_virtual_token_tuples_as_keys() -> None:
    pool, tree = make(8)
    soft = [("adapter-1", 0), ("adapter-1", 1), ("adapter-1", 2), ("adapter-1", 3)]
    assert cache(pool, tree, soft + [10, 11]) == [0, 1, 2]
    assert tree.match(NS, soft + [10, 11, 12]) == MatchResult([0, 1, 2], 6)
    assert tree.match(NS, soft + [99, 11]) == MatchResult([0, 1], 4)
    other = [("adapter-2", 0), ("adapter-2", 1)]
    assert tree.match(NS, other + [10, 11]) == MatchResult([], 0)
    assert tree.match(NS, [("adapter-1", 0), 1]) == MatchResult([], 0)


def test_clear_namespace_frees_unreferenced_and_releases_referenced() -> None:
    pool, tree = make(12)
    cache(pool, tree, [1, 1, 2, 2])  # [0 1]
    held = pool.allocate(1)
    tree.insert(NS, [3, 3], held)  # [2], a running sequence keeps it
    cache(pool, tree, [1, 1, 2, 2], ns=("other",))  # [3 4]
    assert tree.clear_namespace(NS) == [0, 1]
    assert refs(pool)[:5] == [0, 0, 1, 1, 1]
    assert tree.num_cached_blocks == 2
    assert tree.match(NS, [1, 1, 2, 2]) == MatchResult([], 0)
    assert tree.match(NS, [3, 3]) == MatchResult([], 0)
    assert tree.match(("other",), [1, 1, 2, 2]) == MatchResult([3, 4], 4)
    assert pool.decref(held) == [2]
    assert tree.clear_namespace(NS) == []
    assert tree.num_evictable_blocks() == 2


def test_emptied_namespace_root_is_removed() -> None:
    pool, tree = make(8)
    cache(pool, tree, [1, 1], ns=("a",))
    cache(pool, tree, [2, 2], ns=("b",))
    assert tree.evict(1) == [0]
    assert list(tree._roots) == [("b",)]
    assert tree.match(("a",), [1, 1]) == MatchResult([], 0)
    assert list(tree._roots) == [("b",)]  # a miss does not create a root


def test_deep_chain_is_walked_without_recursion() -> None:
    n = 1100  # deeper than the default recursion limit of 1000
    pool, tree = make(n, block_size=1)
    for i in range(n):
        new = pool.allocate(1)
        assert tree.insert(NS, list(range(i + 1)), list(range(i)) + new) == InsertResult(i, 1)
        pool.decref(new)
    assert tree.num_cached_blocks == n
    assert tree.num_evictable_blocks() == n
    assert tree.evict(n) == list(range(n - 1, -1, -1))
    assert pool.num_free == n
