"""One engine step as plain data: what the scheduler decided, in the flat form a forward takes.

No tensors and no model here. The scheduler builds the plan (it owns the block tables and the
shared prefixes), the model runner turns it into tensors in one vectorized pass, and tests
check it with exact rows, block ids and group ids without importing torch.

Rows are the positions that run through the model: a sequence's tokens and its soft-prompt
(prompt/P-tuning) virtual tokens. A prefix-tuning adapter's virtual tokens are not rows: their
K/V is copied from the adapter into the cache (``PrefixCopy``). A chunk's rows are contiguous
(``row_starts`` is cu_seqlens-style); their positions may skip a prefix-tuning span.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.request import AdapterSegment, Sequence


@dataclass(frozen=True, slots=True)
class Chunk:
    """Positions ``[start, end)`` of ``seq.key`` to compute this step; ``sample`` when the
    chunk reaches the end of the key, so the last row's logits pick the next token."""

    seq: Sequence
    start: int
    end: int

    @property
    def sample(self) -> bool:
        return self.end == len(self.seq.key)


@dataclass(frozen=True, slots=True)
class PrefixCopy:
    """``length`` virtual tokens of a prefix-tuning segment, from its token ``offset``, whose
    K/V goes into the cache at positions ``start..start+length`` of chunk ``chunk``."""

    chunk: int
    segment: AdapterSegment
    offset: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class EmbeddingSpan:
    """Rows ``row..row+length`` take a soft prompt's embeddings, from its token ``offset``,
    instead of token embeddings."""

    row: int
    segment: AdapterSegment
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class SharedGroup:
    """Chunks whose sequences share their first ``num_blocks`` blocks (the same block ids,
    cached before this step, every member's rows after them): attention reads that segment
    once for all the members' rows."""

    num_blocks: int
    members: tuple[int, ...]  # chunk indices, ascending


@dataclass(frozen=True)
class BatchPlan:
    """Everything one forward needs, flat. Invariants: ``row_starts[0] == 0`` and
    ``row_starts[-1] == len(token_ids) == len(positions)``; a chunk's rows are
    ``row_starts[i]:row_starts[i+1]``; ``block_tables[i]`` covers positions
    ``[0, context_lens[i])`` of chunk i's sequence; every chunk is in at most one group."""

    chunks: tuple[Chunk, ...]
    row_starts: tuple[int, ...]
    token_ids: tuple[int, ...]  # per row; 0 for a row fed an embedding
    positions: tuple[int, ...]  # per row
    block_tables: tuple[tuple[int, ...], ...]
    context_lens: tuple[int, ...]  # per chunk: its ``end``, the keys its last row sees
    groups: tuple[SharedGroup, ...]
    group_of: tuple[int, ...]  # per chunk: its group's index, or -1
    prefix_copies: tuple[PrefixCopy, ...]
    embedding_spans: tuple[EmbeddingSpan, ...]
    block_size: int

    @property
    def num_rows(self) -> int:
        return self.row_starts[-1]

    @property
    def sample_rows(self) -> list[int]:
        """The last row of each sampling chunk, in chunk order (whose logits are returned)."""
        return [self.row_starts[i + 1] - 1 for i, c in enumerate(self.chunks) if c.sample]

    def subset(self, indices: Seq[int]) -> BatchPlan:
        """The plan of some of the chunks only (the engine re-runs a failed step in parts)."""
        return build_plan([self.chunks[i] for i in indices], self.block_size)


def build_plan(chunks: Seq[Chunk], block_size: int) -> BatchPlan:
    """Lay ``chunks`` out as rows; find the shared-prefix groups (``shared_groups``)."""
    row_starts = [0]
    token_ids: list[int] = []
    positions: list[int] = []
    copies: list[PrefixCopy] = []
    spans: list[EmbeddingSpan] = []
    for index, chunk in enumerate(chunks):
        seq, cursor = chunk.seq, chunk.start
        for v_start, v_end, segment in seq.virtual:
            lo, hi = max(chunk.start, v_start), min(chunk.end, v_end)
            if lo >= hi:
                continue
            _token_rows(seq.key, cursor, lo, token_ids, positions)
            if segment.kind == "prefix_tuning":
                copies.append(PrefixCopy(index, segment, lo - v_start, lo, hi - lo))
            else:
                spans.append(EmbeddingSpan(len(positions), segment, lo - v_start, hi - lo))
                token_ids.extend([0] * (hi - lo))
                positions.extend(range(lo, hi))
            cursor = hi
        _token_rows(seq.key, cursor, chunk.end, token_ids, positions)
        row_starts.append(len(positions))
    tables = tuple(tuple(c.seq.block_table[: -(-c.end // block_size)]) for c in chunks)
    groups, group_of = shared_groups(chunks, tables, row_starts, block_size)
    return BatchPlan(
        chunks=tuple(chunks),
        row_starts=tuple(row_starts),
        token_ids=tuple(token_ids),
        positions=tuple(positions),
        block_tables=tables,
        context_lens=tuple(c.end for c in chunks),
        groups=groups,
        group_of=group_of,
        prefix_copies=tuple(copies),
        embedding_spans=tuple(spans),
        block_size=block_size,
    )


def shared_groups(
    chunks: Seq[Chunk],
    tables: Seq[Seq[int]],
    row_starts: Seq[int],
    block_size: int,
) -> tuple[tuple[SharedGroup, ...], tuple[int, ...]]:
    """Groups of chunks that share cached blocks: chunks with rows whose sequences start with
    the same block id share the longest run of equal block ids that lies wholly before every
    member's chunk (so it was cached before this step). Blocks are shared only through the
    prefix tree, so equal ids mean equal KV: the tree is the one source of this."""
    by_first: dict[int, list[int]] = {}
    for i, chunk in enumerate(chunks):
        if chunk.start >= block_size and row_starts[i + 1] > row_starts[i]:
            by_first.setdefault(tables[i][0], []).append(i)
    groups: list[SharedGroup] = []
    group_of = [-1] * len(chunks)
    for members in by_first.values():
        if len(members) < 2:
            continue
        limit = min(chunks[i].start // block_size for i in members)
        first = tables[members[0]]
        n = min(_common_prefix(first, tables[i], limit) for i in members[1:])
        for i in members:
            group_of[i] = len(groups)
        groups.append(SharedGroup(n, tuple(members)))
    return tuple(groups), tuple(group_of)


def _common_prefix(a: Seq[int], b: Seq[int], limit: int) -> int:
    """How many leading entries of ``a`` and ``b`` are equal, at most ``limit``: slices are
    compared whole (in C), halving the range that holds the first difference."""
    lo, hi = 0, limit  # a[:lo] == b[:lo]; the first difference, if any, is before hi
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _token_rows(
    key: Seq[object], lo: int, hi: int, token_ids: list[int], positions: list[int]
) -> None:
    if lo < hi:
        token_ids.extend(key[lo:hi])  # type: ignore[arg-type]  # positions of real tokens
        positions.extend(range(lo, hi))
