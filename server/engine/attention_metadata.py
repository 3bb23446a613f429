"""What attention reads in one step, built once from the step's flat arrays.

``build_metadata`` turns a ``FlatBatch`` (``flat.py``) into a few padded batches, with numpy in
one pass per step and no loop over sequences: one batch of decode units (a unit per
shared-prefix group: the group's segment, read once, then every member's suffix, each query
masked to the segment and its own suffix), one batch per size class of multi-row chunks
(causal over their suffix), and one of shared segments (every row of a group's multi-row
members over the segment, merged with the suffix result by log-sum-exp). Every layer then
runs the same batches (``attention.prefix_attention``). Plain index arrays and masks, what a
fused kernel or a CUDA graph takes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.engine import native
from server.engine.flat import FlatBatch, concat_ranges, ranks


@dataclass
class PaddedBatch:
    """Units of queries padded into one batch, each unit reading its own list of cache slots.

    ``q_index[u * q_len + j]`` is the flat-batch row of unit u's j-th query (padding points at
    row 0); ``valid`` lists the padded positions that are real queries and ``rows`` the
    flat-batch row of each, in the same order. ``hidden[u, j, k]`` is True where query j of
    unit u must not see key k (its second dimension is 1 when all queries see the same keys).
    """

    q_len: int
    q_index: torch.Tensor  # [U * q_len]
    valid: torch.Tensor  # [R]
    rows: torch.Tensor  # [R]
    slots: torch.Tensor  # [U, S] padded with slot 0
    hidden: torch.Tensor  # [U, q_len | 1, S]
    # The fused backend's additive mask [U, 1, g * q_len | 1, S] (0 or -inf) for g query heads
    # per kv head, made by the first layer that needs it and reused by the others.
    bias: torch.Tensor | None = None
    # ``slots`` as rows of a layer's cache seen as one [Hkv * num_slots, D] matrix, every kv
    # head in turn (see ``attention._gather``), for the cache the metadata was built for.
    cache_rows: torch.Tensor | None = None
    # The native kernel's argument block for this batch (its per-layer pointers are filled
    # in by each call), and the padded queries' destination rows it reads (-1: padding).
    native_job: native.Job | None = None
    dest: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward; built once per step, read by every layer.

    Invariant: each flat-batch row is in exactly one of ``decode`` (complete) or one batch of
    ``suffix``; a ``suffix`` row is in at most one unit of ``shared``, whose segment lies
    before it.
    The cache holds finite values only: a row whose new K or V is not finite is written as
    zeros and flagged in ``nonfinite`` (a masked key's weight is exactly 0, but 0 x inf is NaN,
    so one request's overflow would otherwise reach every query of its decode unit and every
    unit padded with its slots).
    """

    kv_cache: torch.Tensor  # [L, 2, Hkv, num_slots, D]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: PaddedBatch | None  # one-row chunks: a unit per group (segment + suffixes), or alone
    # Multi-row chunks: causal attention to their own suffix, one padded batch per size class
    # (chunks of 2^(k-1) < rows <= 2^k together), so a 40-row question never pads to the
    # 300 rows of a system prompt computed in the same step.
    suffix: list[PaddedBatch]
    shared: PaddedBatch | None  # grouped multi-row chunks: their group's segment, merged by LSE
    nonfinite: torch.Tensor  # [T] bool, or-ed over layers: the row's K/V was not finite
    # "native": the C kernel over the paged cache (``native.py``); "fused": torch's fused SDPA
    # kernel over gathered keys and values; "reference": ``attend``, the test oracle
    backend: str = "fused"


BACKENDS = ("native", "fused", "reference")


def build_metadata(
    flat: FlatBatch,
    kv_cache: torch.Tensor,
    device: torch.device | str,
    backend: str = "fused",
) -> AttentionMetadata:
    """A step's view for attention: a few padded batches, derived from the flat
    metadata with numpy in one pass per step (no loop over sequences, none per layer).
    ``backend`` picks how each batch is computed (``BACKENDS``); all give the same result up
    to float rounding."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
    rows = flat.rows_per_chunk
    one, many = np.flatnonzero(rows == 1), np.flatnonzero(rows > 1)
    grouped = many[flat.group_of[many] >= 0]
    return AttentionMetadata(
        kv_cache=kv_cache,
        slot_mapping=torch.from_numpy(flat.slot_mapping).to(device),
        decode=_to_torch(_decode_units(flat, one), kv_cache, device) if len(one) else None,
        suffix=[
            _to_torch(_suffix_batch(flat, c), kv_cache, device) for c in _size_classes(flat, many)
        ],
        shared=(
            _to_torch(_segment_batch(flat, grouped), kv_cache, device) if len(grouped) else None
        ),
        nonfinite=torch.zeros(len(flat.positions), dtype=torch.bool, device=device),
        backend=backend,
    )


# (q_len, q_index [U, q_len], valid [R], rows [R], slots [U, S], hidden [U, q_len | 1, S])
_Padded = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _to_torch(parts: _Padded, kv_cache: torch.Tensor, device: torch.device | str) -> PaddedBatch:
    q_len, q_index, valid, rows, slots, hidden = parts
    hkv, num_slots = kv_cache.shape[2], kv_cache.shape[3]
    cache_rows = (np.arange(hkv)[:, None] * num_slots + slots.reshape(1, -1)).ravel()
    return PaddedBatch(
        cache_rows=torch.from_numpy(cache_rows).to(device),
        q_len=q_len,
        q_index=torch.from_numpy(q_index.ravel()).to(device),
        valid=torch.from_numpy(valid).to(device),
        rows=torch.from_numpy(rows).to(device),
        slots=torch.from_numpy(slots).to(device),
        hidden=torch.from_numpy(hidden).to(device),
    )


def _slots_of(flat: FlatBatch, chunk: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Cache slots of positions ``pos`` of chunks ``chunk`` (broadcast together); positions
    past a chunk's blocks read its last column (callers mask them)."""
    bs = flat.block_size
    col = np.minimum(pos // bs, flat.block_tables.shape[1] - 1)
    slots: np.ndarray = flat.block_tables[chunk, col] * bs + pos % bs
    return slots


def _query_grid(
    rows: np.ndarray, unit_of: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Query rows ``rows`` placed in their units ``unit_of`` (non-decreasing), in order:
    ``(q_len, q_index [U, q_len], valid, rows)``."""
    per_unit = np.bincount(unit_of)
    q_len = int(per_unit.max())
    q_index = np.zeros((len(per_unit), q_len), dtype=np.int64)
    q_index[unit_of, ranks(per_unit)] = rows
    valid = unit_of * q_len + ranks(per_unit)
    return q_len, q_index, valid, rows


def _decode_units(flat: FlatBatch, chunks: np.ndarray) -> _Padded:
    """One unit per group (its one-row members), one per ungrouped one-row chunk."""
    group = flat.group_of[chunks]
    key = np.where(group >= 0, group, len(flat.group_blocks) + np.arange(len(chunks)))
    order = np.argsort(key, kind="stable")
    chunks, group, key = chunks[order], group[order], key[order]
    _, first, members = np.unique(key, return_index=True, return_counts=True)
    n_units = len(first)
    unit_of = np.repeat(np.arange(n_units), members)
    seg_len = np.zeros(n_units, dtype=np.int64)
    grouped = group[first] >= 0
    seg_len[grouped] = flat.group_blocks[group[first][grouped]] * flat.block_size
    sfx_start = flat.suffix_starts[chunks]
    sfx_len = flat.context_lens[chunks] - sfx_start
    before = np.cumsum(sfx_len) - sfx_len  # suffix keys of the chunks before, all units
    offset = seg_len[unit_of] + before - before[first][unit_of]  # where its suffix sits
    width = seg_len + np.bincount(unit_of, weights=sfx_len, minlength=n_units).astype(np.int64)
    slots = np.zeros((n_units, int(width.max())), dtype=np.int64)
    seg_unit, seg_pos = np.repeat(np.arange(n_units), seg_len), ranks(seg_len)
    slots[seg_unit, seg_pos] = _slots_of(flat, chunks[first][seg_unit], seg_pos)
    slots[np.repeat(unit_of, sfx_len), concat_ranges(offset, sfx_len)] = _slots_of(
        flat, np.repeat(chunks, sfx_len), concat_ranges(sfx_start, sfx_len)
    )
    q_len, q_index, valid, rows = _query_grid(flat.row_starts[chunks], unit_of)
    # Member j sees the segment and its own suffix; a padding query sees every key of its
    # unit (its result is dropped; a query that sees no key would be NaN).
    lo = np.zeros((n_units, q_len), dtype=np.int64)
    hi = np.repeat(width[:, None], q_len, axis=1)
    rank = ranks(members)
    lo[unit_of, rank], hi[unit_of, rank] = offset, offset + sfx_len
    k = np.arange(slots.shape[1])[None, None, :]
    sees = ((k >= lo[:, :, None]) & (k < hi[:, :, None])) | (k < seg_len[:, None, None])
    return q_len, q_index, valid, rows, slots, ~sees


def _size_classes(flat: FlatBatch, chunks: np.ndarray) -> list[np.ndarray]:
    """``chunks`` split by row count into classes (2^(k-1), 2^k], each in the given order."""
    if not len(chunks):
        return []
    size_class = np.ceil(np.log2(flat.rows_per_chunk[chunks])).astype(np.int64)
    return [chunks[size_class == k] for k in np.unique(size_class)]


def _suffix_batch(flat: FlatBatch, chunks: np.ndarray) -> _Padded:
    """Each multi-row chunk's rows, causally, over its suffix's keys."""
    counts = flat.rows_per_chunk[chunks]
    unit_of = np.repeat(np.arange(len(chunks)), counts)
    q_len, q_index, valid, rows = _query_grid(
        concat_ranges(flat.row_starts[chunks], counts), unit_of
    )
    start = flat.suffix_starts[chunks]
    end = flat.context_lens[chunks]
    kpos = start[:, None] + np.arange(int((end - start).max()))[None, :]
    is_key = kpos < end[:, None]
    slots = np.where(is_key, _slots_of(flat, chunks[:, None], kpos), 0)
    qpos = flat.positions[q_index]  # padding queries read row 0's position: dropped anyway
    hidden = ~is_key[:, None, :] | (kpos[:, None, :] > qpos[:, :, None])
    hidden[:, :, 0] = False  # every query sees its suffix's first key (padding: no NaN)
    return q_len, q_index, valid, rows, slots, hidden


def _segment_batch(flat: FlatBatch, chunks: np.ndarray) -> _Padded:
    """All rows of a group's multi-row members over the group's segment (non-causal)."""
    group = flat.group_of[chunks]
    order = np.argsort(group, kind="stable")
    chunks, group = chunks[order], group[order]
    groups, unit_of_chunk = np.unique(group, return_inverse=True)
    counts = flat.rows_per_chunk[chunks]
    q_len, q_index, valid, rows = _query_grid(
        concat_ranges(flat.row_starts[chunks], counts), np.repeat(unit_of_chunk, counts)
    )
    seg_len = flat.group_blocks[groups] * flat.block_size
    kpos = np.broadcast_to(
        np.arange(int(seg_len.max()))[None, :], (len(groups), int(seg_len.max()))
    )
    is_key = kpos < seg_len[:, None]
    owner = flat.group_first[groups][:, None]
    slots = np.where(is_key, _slots_of(flat, owner, kpos), 0)
    return q_len, q_index, valid, rows, slots, ~is_key[:, None, :]
