from __future__ import annotations

import pytest

from server.engine.kv_cache import BlockPool, NoFreeBlocks


def test_allocate_ascending_ids_with_ref_one() -> None:
    pool = BlockPool(5)
    assert pool.allocate(3) == [0, 1, 2]
    assert [pool.refcount(i) for i in range(5)] == [1, 1, 1, 0, 0]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free == 0


def test_allocate_zero_returns_empty() -> None:
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    assert pool.num_free == 2


def test_freed_blocks_are_reused_fifo() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.decref([2, 0]) == [2, 0]
    # free queue is now [3, 2, 0]: the never-used block first, then in the order freed
    assert pool.allocate(2) == [3, 2]
    assert pool.decref([1]) == [1]
    assert pool.allocate(2) == [0, 1]


def test_no_free_blocks_leaves_state_unchanged() -> None:
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    with pytest.raises(NoFreeBlocks):
        pool.allocate(3)
    assert pool.num_free == 2
    assert [pool.refcount(i) for i in range(4)] == [1, 1, 0, 0]
    assert pool.allocate(2) == [2, 3]


def test_refcounts_and_decref_returns_only_blocks_that_became_free() -> None:
    pool = BlockPool(3)
    assert pool.allocate(3) == [0, 1, 2]
    pool.incref([0, 1])
    pool.incref([1])
    assert [pool.refcount(i) for i in range(3)] == [2, 3, 1]
    assert pool.decref([0, 1, 2]) == [2]
    assert [pool.refcount(i) for i in range(3)] == [1, 2, 0]
    assert pool.decref([1, 0]) == [0]
    assert pool.decref([1]) == [1]
    assert pool.num_free == 3


def test_incref_and_decref_of_free_block_assert() -> None:
    pool = BlockPool(2)
    with pytest.raises(AssertionError):
        pool.incref([0])
    with pytest.raises(AssertionError):
        pool.decref([1])
    assert pool.num_free == 2


def test_usage_fraction() -> None:
    pool = BlockPool(4)
    assert pool.usage() == 0.0
    pool.allocate(1)
    assert pool.usage() == 0.25
    pool.allocate(3)
    assert pool.usage() == 1.0
    assert BlockPool(0).usage() == 0.0
