"""Reference-counted pool of KV block ids.

The pool only hands out integers; the tensors they index live with the model runner. Keeping
the bookkeeping free of torch lets the scheduler and the prefix tree be tested on the CPU with
exact block ids.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class NoFreeBlocks(RuntimeError):
    """Raised by `BlockPool.allocate` when fewer blocks are free than were asked for."""


class BlockPool:
    """Fixed pool of KV block ids ``0..num_blocks-1`` with reference counts.

    Invariants:
    - A block is free iff its ref count is 0; free blocks sit in the free queue exactly once.
    - Owners: each running sequence holds one reference per block in its block table; the
      prefix tree holds one per block it stores. A block shared by the tree and two sequences
      therefore has ref count 3.
    - Allocation order is deterministic: initially ids ascending; a block that becomes free
      goes to the end of the free queue (FIFO reuse), so recently freed blocks, which may still
      be worth keeping warm elsewhere, are reused last.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Number of blocks with ref count 0."""
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks from the front of the free queue, each with ref count 1.

        Raises `NoFreeBlocks` and changes nothing when fewer than `n` blocks are free.
        """
        assert n >= 0, n
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._refs[i] = 1
        return ids

    def incref(self, ids: Iterable[int]) -> None:
        """Add one reference to each id; every id must already be allocated (ref > 0)."""
        for i in ids:
            assert self._refs[i] > 0, f"incref of free block {i}"
            self._refs[i] += 1

    def decref(self, ids: Iterable[int]) -> list[int]:
        """Drop one reference from each id; returns the ids that became free, in the order given."""
        freed: list[int] = []
        for i in ids:
            assert self._refs[i] > 0, f"decref of free block {i}"
            self._refs[i] -= 1
            if self._refs[i] == 0:
                self._free.append(i)
                freed.append(i)
        return freed

    def refcount(self, block_id: int) -> int:
        """Current number of references to `block_id` (0 means free)."""
        return self._refs[block_id]

    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]; 0.0 for an empty pool."""
        if self.num_blocks == 0:
            return 0.0
        return (self.num_blocks - len(self._free)) / self.num_blocks
