"""A step's plan as flat integer arrays: what any attention backend takes (numpy, no torch).

``flatten`` turns a ``BatchPlan`` into cu_seqlens-style offsets, per-row positions and cache
slots, padded block tables, and each chunk's shared-prefix group, in one vectorized pass (no
Python loop over sequences or rows). The reference backend (``attention_metadata.build_metadata``)
derives its padded batches from these; a fused kernel or a CUDA graph would read them as they
are. Slots: ``slot = block_id * block_size + position % block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.engine.batch import BatchPlan

IntArray = np.ndarray  # int64 throughout


@dataclass(frozen=True)
class FlatBatch:
    """Invariants: ``row_starts`` has one more entry than there are chunks, starts at 0 and
    ends at the number of rows; ``block_tables[i, :ceil(context_lens[i] / block_size)]`` are
    chunk i's blocks (the rest is padding, 0); a chunk's rows attend to the keys of positions
    ``suffix_starts[i]..context_lens[i]`` causally and, when ``group_of[i] >= 0``, to its
    group's segment, positions ``0..group_blocks[group_of[i]] * block_size``, all of them."""

    row_starts: IntArray  # [C + 1]
    positions: IntArray  # [T]
    slot_mapping: IntArray  # [T] where each row's K/V is written
    chunk_of_row: IntArray  # [T]
    context_lens: IntArray  # [C]
    suffix_starts: IntArray  # [C]
    block_tables: IntArray  # [C, max_blocks]
    group_of: IntArray  # [C], -1 for none
    group_blocks: IntArray  # [G]
    group_first: IntArray  # [G]: a member chunk whose block table holds the segment
    sample_rows: IntArray  # [S]
    block_size: int

    @property
    def num_chunks(self) -> int:
        return len(self.context_lens)

    @property
    def rows_per_chunk(self) -> IntArray:
        return np.diff(self.row_starts)

    def slots(self, chunk: int, start: int, length: int) -> IntArray:
        """Cache slots of positions ``start..start+length`` of one chunk's sequence."""
        pos = np.arange(start, start + length)
        slots: IntArray = self.block_tables[chunk, pos // self.block_size] * self.block_size + (
            pos % self.block_size
        )
        return slots


def flatten(plan: BatchPlan) -> FlatBatch:
    bs = plan.block_size
    row_starts = np.asarray(plan.row_starts, dtype=np.int64)
    positions = np.asarray(plan.positions, dtype=np.int64)
    counts = np.diff(row_starts)
    chunk_of_row = np.repeat(np.arange(len(plan.chunks)), counts)
    tables = block_table_array(plan.block_tables)
    slot_mapping = tables[chunk_of_row, positions // bs] * bs + positions % bs
    group_of = np.asarray(plan.group_of, dtype=np.int64)
    group_blocks = np.asarray([g.num_blocks for g in plan.groups], dtype=np.int64)
    suffix_starts = np.zeros(len(plan.chunks), dtype=np.int64)
    if len(group_blocks):
        suffix_starts = np.where(group_of >= 0, group_blocks[np.maximum(group_of, 0)] * bs, 0)
    return FlatBatch(
        row_starts=row_starts,
        positions=positions,
        slot_mapping=slot_mapping,
        chunk_of_row=chunk_of_row,
        context_lens=np.asarray(plan.context_lens, dtype=np.int64),
        suffix_starts=suffix_starts,
        block_tables=tables,
        group_of=group_of,
        group_blocks=group_blocks,
        group_first=np.asarray([g.members[0] for g in plan.groups], dtype=np.int64),
        sample_rows=np.asarray(plan.sample_rows, dtype=np.int64),
        block_size=bs,
    )


def block_table_array(tables: tuple[tuple[int, ...], ...]) -> IntArray:
    """Ragged block tables as one ``[C, max_blocks]`` array, padded with 0."""
    lengths = np.fromiter((len(t) for t in tables), dtype=np.int64, count=len(tables))
    out = np.zeros((len(tables), max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    flat = np.fromiter((b for t in tables for b in t), dtype=np.int64, count=int(lengths.sum()))
    rows = np.repeat(np.arange(len(tables)), lengths)
    out[rows, ranks(lengths)] = flat
    return out


def ranks(lengths: IntArray) -> IntArray:
    """``0..n-1`` for each length ``n``, concatenated: [2, 3] -> [0, 1, 0, 1, 2]."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    ranked: IntArray = np.arange(total) - np.repeat(starts, lengths)
    return ranked


def concat_ranges(starts: IntArray, lengths: IntArray) -> IntArray:
    """``start..start+n`` for each pair, concatenated."""
    ranges: IntArray = np.repeat(starts, lengths) + ranks(lengths)
    return ranges
