"""Decode attention on the GPU: a Triton kernel that reads keys and values where they lie in
the paged cache, through each sequence's block table.

One query row per sequence (a decode step). A program takes one sequence, one kv head and one
split of the sequence's keys: it loads the ``g`` query heads of that kv head as one small
matrix, so every key block feeds all of them (GQA without copying keys per query head), and
keeps a running maximum, total and weighted sum (the flash-attention recurrence). Splitting
the keys gives a small batch enough programs to fill the device; a last kernel merges the
splits by their log-sum-exp. Shapes depend only on the batch size, never on the sequences'
lengths (those are read from a tensor), so a CUDA graph captured once per batch size replays
for any lengths up to the block table's width.

A shared-prefix group's segment (the same blocks at the front of every member's table) is
read once for the whole group (Hydragen): a program takes up to 64 query rows of the group's
members (16 members of 4 query heads) as one matrix over one split of the segment, and each
member's own program starts after the segment; every split of both kinds is merged by its
log-sum-exp. On an H200 with a 4,096-position prefix shared by 64 sequences this took a
decode step from 3.11 to 2.15 ms of GPU time (docs/benchmarks.md, W3).

Float32 products run in IEEE float32 (``input_precision="ieee"``), not TF32, so float32
results stay within float32 rounding of the CPU engine's. In bfloat16 the weights are rounded
to bfloat16 for the weighted sum (as eager attention does) and the statistics stay float32.

Runs under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``), which is how the tests
check it where there is no GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch


def available() -> str:
    """Why the kernel cannot run here, or an empty string where it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return ""


@dataclass
class PagedDecode:
    """A decode batch's view of the paged cache: row ``b`` of the step is a sequence whose
    ``lens[b]`` keys sit at positions ``0..lens[b]`` of its blocks ``tables[b]``; its own new
    key is among them (written before attention).

    Shared-prefix groups (Hydragen): group ``g``'s first ``seg_lens[g]`` keys are the same
    blocks ``seg_tables[g]`` for each of its member rows ``members[g]`` (-1 pads a row of
    ``members``; a group of length 0 is unused). Their queries read the segment once, together,
    as one matrix; each member then reads only its own keys, from ``starts[b]`` (its group's
    segment length, 0 for a row in no group), and the two parts are merged by log-sum-exp."""

    tables: torch.Tensor  # [B, max_blocks] int32 block ids
    lens: torch.Tensor  # [B] int32 keys to attend to (>= 1)
    block_size: int
    splits: int  # key splits per (sequence, kv head) of the own keys: a power of two
    starts: torch.Tensor | None = None  # [B] int32 first own key (after the group's segment)
    seg_tables: torch.Tensor | None = None  # [G, max_blocks] int32
    seg_lens: torch.Tensor | None = None  # [G] int32
    members: torch.Tensor | None = None  # [G, B] int32 rows, -1 padded
    seg_splits: int = 8  # key splits of a segment


def splits_for(batch: int, kv_heads: int, programs: int) -> int:
    """Key splits so that ``batch * kv_heads * splits`` programs reach ``programs`` (a
    power of two, at most 16)."""
    splits = 1
    while splits < 16 and batch * kv_heads * splits < programs:
        splits *= 2
    return splits


def _kernels() -> Any:
    """The kernels' module, imported on first use (and triton with it)."""
    from server.engine import triton_kernels

    return triton_kernels


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def workspace(
    batch: int, q_heads: int, head_dim: int, paged: PagedDecode, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each split's partial output and log-sum-exp, ``[B, Hq, splits, D]`` and ``[B, Hq,
    splits]``; splits that no program writes (the padding to a power of two, the segment
    splits of rows in no group: the same ones in every layer) hold -inf and weigh nothing."""
    seg_splits = paged.seg_splits if paged.seg_lens is not None else 0
    total = _pow2(paged.splits + seg_splits)
    shape = (batch, q_heads, total)
    parts = torch.empty(*shape, _pow2(head_dim), dtype=torch.float32, device=device)
    return parts, torch.full(shape, float("-inf"), dtype=torch.float32, device=device)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    paged: PagedDecode,
    scale: float,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one query row per sequence over its paged keys (and its group's
    segment, read once per group, where ``paged`` has groups).

    q: ``[Hq, B, D]`` (any strides with unit stride along D); k_cache, v_cache: one layer's
    ``[Hkv, num_slots, D]`` (same strides). Returns ``[Hq, B, D]`` (a view of a ``[B, Hq,
    D]`` tensor, the layout the output projection reads). ``work``: ``workspace``'s tensors,
    made once for all the layers of a step (else made here)."""
    kernels = _kernels()
    hq, batch, d = q.shape
    hkv = k_cache.shape[0]
    g = hq // hkv
    d_pad = _pow2(d)
    grouped = paged.seg_lens is not None
    seg_splits = paged.seg_splits if grouped else 0
    parts, lse = work if work is not None else workspace(batch, hq, d, paged, q.device)
    total = parts.shape[2]
    out = torch.empty(batch, hq, d, dtype=q.dtype, device=q.device)
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    ieee = q.dtype == torch.float32
    common = (q.stride(1), q.stride(0), k_cache.stride(0), k_cache.stride(1))
    kernels.own_partial[(batch, hkv, paged.splits)](
        q,
        k_cache,
        v_cache,
        paged.tables,
        paged.lens,
        paged.starts if paged.starts is not None else paged.lens,
        parts,
        lse,
        *common,
        paged.tables.stride(0),
        scale,
        hq,
        total,
        G=g,
        G_PAD=max(16, _pow2(g)),
        D=d,
        D_PAD=d_pad,
        PAGE=paged.block_size,
        BLOCK_N=64,
        SPLITS=paged.splits,
        HAS_STARTS=paged.starts is not None,
        IEEE=ieee,
    )
    if grouped:
        assert paged.seg_tables is not None and paged.members is not None
        g_pad = _pow2(g)
        block_m = max(1, 64 // g_pad)
        groups, width = paged.members.shape
        tiles = -(-width // block_m)
        kernels.segment_partial[(groups * tiles, hkv, seg_splits)](
            q,
            k_cache,
            v_cache,
            paged.seg_tables,
            paged.seg_lens,
            paged.members,
            parts,
            lse,
            *common,
            paged.seg_tables.stride(0),
            paged.members.stride(0),
            scale,
            hq,
            total,
            paged.splits,
            G=g,
            G_PAD=g_pad,
            D=d,
            D_PAD=d_pad,
            PAGE=paged.block_size,
            BLOCK_N=64,
            BLOCK_M=block_m,
            M_TILES=tiles,
            SPLITS=seg_splits,
            IEEE=ieee,
        )
    kernels.merge[(batch, hq)](
        parts, lse, out, out.stride(0), out.stride(1), hq, D=d, D_PAD=d_pad, SPLITS=total
    )
    return out.transpose(0, 1)
