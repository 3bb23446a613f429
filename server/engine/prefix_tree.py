"""Radix tree of KV blocks keyed by (namespace, tokens).

A key is a sequence of hashable tokens: an int token id, or a tuple naming a virtual token of
an adapter (e.g. ``("adapter-id", 3)``). The tree stores whole blocks of `block_size` tokens
only; a partial block at the end of a key is never cached.

Every key lives under a namespace (any hashable, e.g. ``(tenant, adapter_id, content_hash)``).
Each namespace has its own root, so two namespaces never share nodes and a lookup in one can
never return KV computed under another.

The tree is the one owner of shared prefixes: it holds the blocks that are cached, and the
claims on blocks being computed (``claim``), so that a sequence needing a block another
running sequence is computing waits for it instead of computing it twice.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from server.engine.kv_cache import BlockPool


class MatchResult(NamedTuple):
    blocks: list[int]
    """Block ids of the longest cached prefix, whole blocks only, in key order."""
    num_tokens: int
    """Tokens covered by `blocks`: always ``len(blocks) * block_size``."""


class InsertResult(NamedTuple):
    num_cached: int
    """Tokens of the key already in the tree. Their blocks stay the tree's; the caller's blocks
    for that part are not taken (no reference is added to them)."""
    num_inserted: int
    """Tokens newly stored; the tree took one reference on each of their blocks."""


@dataclass(eq=False, slots=True)
class _Node:
    """One edge of the radix tree.

    `edge` holds ``len(blocks) * block_size`` tokens (empty only for a namespace root).
    `children` is keyed by the first block of each child's edge, as a tuple, so siblings always
    differ in their first block. Along any root-to-leaf path `last_used` never increases:
    marking a node used marks its whole path.
    """

    edge: tuple[Hashable, ...]
    blocks: list[int]
    parent: _Node | None
    last_used: int
    uid: int
    namespace: Hashable = None  # set on roots only; used to drop an emptied root
    children: dict[tuple[Hashable, ...], _Node] = field(default_factory=dict)


class PrefixTree:
    """Radix tree of KV blocks with LRU eviction of unreferenced leaves.

    Invariants:
    - The tree holds exactly one pool reference per block it stores (`num_cached_blocks`).
    - A node is evictable iff it is a leaf and every one of its blocks has pool ref count 1,
      i.e. only the tree holds it. A running sequence's reference (ref > 1) pins the node, and
      its ancestors with it, since they keep a child.
    - Block ids returned by `match` are owned by the tree; a caller that keeps them must
      `pool.incref` them before anything can call `evict` or `clear_namespace`.
    - Recency is a logical clock bumped once per `match`/`insert` call, not wall time, so
      eviction order is deterministic; ties go to the node created first.
    - A namespace root exists only while it has children.
    """

    def __init__(self, block_size: int, pool: BlockPool) -> None:
        assert block_size > 0, block_size
        self.block_size = block_size
        self.pool = pool
        self._roots: dict[Hashable, _Node] = {}
        self._clock = 0
        self._uids = itertools.count()
        self._num_cached_blocks = 0
        # Blocks being computed: chained hash of (namespace, key blocks) -> its claimant, and
        # each claimant's hashes. Equal hashes mean equal prefixes up to hash collisions,
        # which only ever make a sequence wait one more step.
        self._claims: dict[int, str] = {}
        self._claimed_by: dict[str, list[int]] = {}

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the tree holds a reference on."""
        return self._num_cached_blocks

    def match(self, namespace: Hashable, key: Sequence[Hashable]) -> MatchResult:
        """Longest prefix of `key` cached under `namespace`, in whole blocks.

        Marks the matched path as used now. If the match ends inside a node's edge, that node
        is split at the block boundary so the matched part is a node of its own (and the
        unmatched tail can be evicted first). Does not change ref counts.
        """
        self._clock += 1
        root = self._roots.get(namespace)
        if root is None:
            return MatchResult([], 0)
        path, num_matched = self._walk(root, key, len(key) // self.block_size)
        self._touch(path)
        blocks = [b for node in path for b in node.blocks]
        return MatchResult(blocks, num_matched * self.block_size)

    def insert(
        self, namespace: Hashable, key: Sequence[Hashable], blocks: Sequence[int]
    ) -> InsertResult:
        """Store `blocks` as the KV of `key` under `namespace`.

        ``len(key)`` must be a multiple of `block_size` and ``len(blocks)`` equal to
        ``len(key) // block_size``. The part already cached keeps the tree's blocks; the rest is
        stored as one new node holding the caller's blocks for it, on which the tree takes one
        reference each. Marks the whole path as used now.
        """
        bs = self.block_size
        assert len(key) % bs == 0, f"key length {len(key)} is not a multiple of {bs}"
        num_blocks = len(key) // bs
        assert len(blocks) == num_blocks, f"{len(blocks)} blocks for {num_blocks} key blocks"
        self._clock += 1
        root = self._roots.get(namespace)
        path: list[_Node] = []
        num_matched = 0
        if root is not None:
            path, num_matched = self._walk(root, key, num_blocks)
        if num_matched < num_blocks:
            if root is None:
                root = self._new_node((), [], None)
                root.namespace = namespace
                self._roots[namespace] = root
            parent = path[-1] if path else root
            node = self._new_node(
                tuple(key[num_matched * bs :]), list(blocks[num_matched:]), parent
            )
            parent.children[node.edge[:bs]] = node
            self.pool.incref(node.blocks)
            self._num_cached_blocks += len(node.blocks)
            path.append(node)
        self._touch(path)
        return InsertResult(num_matched * bs, (num_blocks - num_matched) * bs)

    def evict(self, num_blocks: int) -> list[int]:
        """Free at least `num_blocks` blocks if possible, fewer if not enough are evictable.

        Repeatedly removes the least recently used evictable leaf (see the class invariants),
        dropping the tree's reference on its blocks; a parent that becomes an evictable leaf is
        a candidate at once. Whole nodes are removed, so more than `num_blocks` may be freed.
        Returns the freed block ids in the order freed.

        Cost: one scan over all nodes to seed a heap of evictable leaves, then O(log n) per
        removed node; fine for trees of thousands of nodes.
        """
        heap = [
            (n.last_used, n.uid, n)
            for n in self._iter_nodes()
            if not n.children and self._unreferenced(n)
        ]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            freed += self._remove_leaf(node)
            if parent.parent is not None and not parent.children and self._unreferenced(parent):
                heapq.heappush(heap, (parent.last_used, parent.uid, parent))
        return freed

    def num_evictable_blocks(self) -> int:
        """How many blocks ``evict(num_cached_blocks)`` would free right now: blocks of nodes
        whose whole subtree, the node included, is unreferenced by sequences."""
        nodes = list(self._iter_nodes())
        subtree_free: dict[int, bool] = {}
        total = 0
        for node in reversed(nodes):  # pre-order reversed: children before their parent
            ok = self._unreferenced(node) and all(
                subtree_free[c.uid] for c in node.children.values()
            )
            subtree_free[node.uid] = ok
            if ok:
                total += len(node.blocks)
        return total

    def clear_namespace(self, namespace: Hashable) -> list[int]:
        """Drop every node under `namespace` (e.g. when an adapter version is deleted).

        The tree's reference on each block is dropped; returns the ids that became free, in
        pre-order. Blocks a running sequence still references stay allocated until that
        sequence frees them; they are no longer findable through the tree.
        """
        root = self._roots.pop(namespace, None)
        if root is None:
            return []
        freed: list[int] = []
        for node in self._iter_subtree(root):
            self._num_cached_blocks -= len(node.blocks)
            freed += self.pool.decref(node.blocks)
        return freed

    # Prefixes being computed ------------------------------------------------------------
    def claim(self, namespace: Hashable, key: Sequence[Hashable], first: int, owner: str) -> None:
        """``owner`` (a running sequence) computes the whole blocks of ``key`` from block
        ``first`` on; blocks another owner already claimed stay that owner's. Released with
        ``release(owner)``, when the owner has computed its key or stops."""
        mine = [h for h in self._chain(namespace, key)[first:] if h not in self._claims]
        for h in mine:
            self._claims[h] = owner
        self._claimed_by.setdefault(owner, []).extend(mine)

    def claimant(self, namespace: Hashable, key: Sequence[Hashable], block: int) -> str | None:
        """Who is computing block ``block`` of ``key``, if anyone."""
        chain = self._chain(namespace, key, block + 1)
        return self._claims.get(chain[block]) if block < len(chain) else None

    def release(self, owner: str) -> None:
        for h in self._claimed_by.pop(owner, ()):
            if self._claims.get(h) == owner:
                del self._claims[h]

    def _chain(
        self, namespace: Hashable, key: Sequence[Hashable], limit: int | None = None
    ) -> list[int]:
        """Chained hashes of the key's whole blocks (the first ``limit`` of them)."""
        bs = self.block_size
        n = len(key) // bs if limit is None else min(limit, len(key) // bs)
        out, h = [], hash(namespace)
        for i in range(n):
            h = hash((h, tuple(key[i * bs : (i + 1) * bs])))
            out.append(h)
        return out

    def _walk(
        self, root: _Node, key: Sequence[Hashable], num_blocks: int
    ) -> tuple[list[_Node], int]:
        """Follow the first `num_blocks` blocks of `key` down from `root`.

        Returns the nodes matched in full (root excluded) and the number of blocks matched.
        A node matched only in part is split first, so the path always ends on a node boundary.
        """
        bs = self.block_size
        node = root
        path: list[_Node] = []
        matched = 0
        while matched < num_blocks:
            child = node.children.get(tuple(key[matched * bs : (matched + 1) * bs]))
            if child is None:
                break
            n = 1  # the first block matched through the children lookup
            limit = min(len(child.blocks), num_blocks - matched)
            # The common case, a long edge matched whole, in one comparison (in C); else
            # block by block to the first difference.
            if limit > 1:
                span = tuple(key[matched * bs : (matched + limit) * bs])
                edge = child.edge if limit == len(child.blocks) else child.edge[: limit * bs]
                if span == edge:
                    n = limit
            while (
                n < limit
                and tuple(key[(matched + n) * bs : (matched + n + 1) * bs])
                == child.edge[n * bs : (n + 1) * bs]
            ):
                n += 1
            if n < len(child.blocks):
                child = self._split(child, n)
            path.append(child)
            matched += n
            node = child
        return path, matched

    def _split(self, node: _Node, num_blocks: int) -> _Node:
        """Cut `node` after its first `num_blocks` blocks; returns the new head node, which
        takes the node's place under its parent. Ref counts are unchanged."""
        bs = self.block_size
        parent = node.parent
        assert parent is not None and 0 < num_blocks < len(node.blocks)
        head = self._new_node(node.edge[: num_blocks * bs], node.blocks[:num_blocks], parent)
        head.last_used = node.last_used
        parent.children[head.edge[:bs]] = head
        node.edge = node.edge[num_blocks * bs :]
        node.blocks = node.blocks[num_blocks:]
        node.parent = head
        head.children[node.edge[:bs]] = node
        return head

    def _remove_leaf(self, node: _Node) -> list[int]:
        parent = node.parent
        assert parent is not None and not node.children
        del parent.children[node.edge[: self.block_size]]
        if parent.parent is None and not parent.children:
            del self._roots[parent.namespace]
        self._num_cached_blocks -= len(node.blocks)
        return self.pool.decref(node.blocks)

    def _new_node(
        self, edge: tuple[Hashable, ...], blocks: list[int], parent: _Node | None
    ) -> _Node:
        return _Node(edge, blocks, parent, self._clock, next(self._uids))

    def _touch(self, path: list[_Node]) -> None:
        for node in path:
            node.last_used = self._clock

    def _unreferenced(self, node: _Node) -> bool:
        return all(self.pool.refcount(b) == 1 for b in node.blocks)

    def _iter_nodes(self) -> Iterator[_Node]:
        """Every non-root node, pre-order."""
        for root in list(self._roots.values()):
            yield from self._iter_subtree(root)

    @staticmethod
    def _iter_subtree(root: _Node) -> Iterator[_Node]:
        """Nodes below `root` (root excluded) in pre-order, children in insertion order;
        iterative because a long conversation can make a path deeper than Python's stack."""
        stack = list(reversed(root.children.values()))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children.values()))
