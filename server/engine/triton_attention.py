"""Decode attention on the GPU: a Triton kernel that reads keys and values where they lie in
the paged cache, through each sequence's block table.

One query row per sequence (a decode step). A program takes one sequence, one kv head and one
split of the sequence's keys: it loads the ``g`` query heads of that kv head as one small
matrix, so every key block feeds all of them (GQA without copying keys per query head), and
keeps a running maximum, total and weighted sum (the flash-attention recurrence). Splitting
the keys gives a small batch enough programs to fill the device; a second kernel merges the
splits by their log-sum-exp. Shapes depend only on the batch size, never on the sequences'
lengths (those are read from a tensor), so a CUDA graph captured once per batch size replays
for any lengths up to the block table's width.

Sequences of one shared-prefix group list the same block ids for their shared segment, so
their programs read the same memory: it comes from HBM about once and from the L2 cache after
(a 1,056-token segment of a Llama-3.2-1B layer is 2 MB of keys and values).

Float32 products run in IEEE float32 (``input_precision="ieee"``), not TF32, so float32
results stay within float32 rounding of the CPU engine's. In bfloat16 the weights are rounded
to bfloat16 for the weighted sum (as eager attention does) and the statistics stay float32.

Runs under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``), which is how the tests
check it where there is no GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

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
    key is among them (written before attention)."""

    tables: torch.Tensor  # [B, max_blocks] int32 block ids
    lens: torch.Tensor  # [B] int32 keys to attend to (>= 1)
    block_size: int
    splits: int  # key splits per (sequence, kv head): a power of two


def splits_for(batch: int, kv_heads: int, programs: int) -> int:
    """Key splits so that ``batch * kv_heads * splits`` programs reach ``programs`` (a
    power of two, at most 16)."""
    splits = 1
    while splits < 16 and batch * kv_heads * splits < programs:
        splits *= 2
    return splits


_KERNELS: dict[str, object] = {}


def _kernels() -> tuple[object, object]:
    """The two Triton kernels, defined on first use (triton is imported only then)."""
    if not _KERNELS:
        _KERNELS.update(_define())
    return _KERNELS["partial"], _KERNELS["merge"]


def _define() -> dict[str, object]:
    import triton
    import triton.language as tl

    @triton.jit
    def partial(
        q_ptr,
        k_ptr,
        v_ptr,
        tables_ptr,
        lens_ptr,
        part_ptr,
        lse_ptr,
        q_row_stride,
        q_head_stride,
        cache_head_stride,
        cache_slot_stride,
        table_stride,
        scale,
        q_heads,
        G: tl.constexpr,
        G_PAD: tl.constexpr,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        n = tl.load(lens_ptr + b)
        per_split = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
        start = s * per_split
        end = tl.minimum(start + per_split, n)
        rows = tl.arange(0, G_PAD)
        dims = tl.arange(0, D_PAD)
        heads = h * G + rows
        row_ok = rows < G
        dim_ok = dims < D
        q = tl.load(
            q_ptr + heads[:, None] * q_head_stride + b * q_row_stride + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        top = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        total = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        k_base = k_ptr + h.to(tl.int64) * cache_head_stride
        v_base = v_ptr + h.to(tl.int64) * cache_head_stride
        for first in range(start, end, BLOCK_N):
            pos = first + tl.arange(0, BLOCK_N)
            valid = pos < end
            page = tl.load(tables_ptr + b * table_stride + pos // PAGE, mask=valid, other=0)
            slot = page.to(tl.int64) * PAGE + pos % PAGE
            offs = slot[:, None] * cache_slot_stride + dims[None, :]
            kv_ok = valid[:, None] & dim_ok[None, :]
            k = tl.load(k_base + offs, mask=kv_ok, other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            alpha = tl.exp(top - new_top)
            weights = tl.exp(scores - new_top[:, None])
            total = total * alpha + tl.sum(weights, 1)
            v = tl.load(v_base + offs, mask=kv_ok, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(weights, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
            top = new_top
        some = total > 0
        out = tl.where(some[:, None], acc / tl.where(some, total, 1.0)[:, None], 0.0)
        lse = tl.where(some, top + tl.log(tl.where(some, total, 1.0)), float("-inf"))
        at = (b * q_heads + heads) * SPLITS + s
        tl.store(
            part_ptr + at[:, None] * D_PAD + dims[None, :],
            out,
            mask=row_ok[:, None] & dim_ok[None, :],
        )
        tl.store(lse_ptr + at, lse, mask=row_ok)

    @triton.jit
    def merge(
        part_ptr,
        lse_ptr,
        out_ptr,
        out_row_stride,
        out_head_stride,
        q_heads,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        splits = tl.arange(0, SPLITS)
        dims = tl.arange(0, D_PAD)
        at = (b * q_heads + hq) * SPLITS + splits
        lse = tl.load(lse_ptr + at)
        top = tl.max(lse, 0)  # finite: the first split always holds a key
        weights = tl.exp(lse - top)
        parts = tl.load(part_ptr + at[:, None] * D_PAD + dims[None, :])
        out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
        tl.store(
            out_ptr + b * out_row_stride + hq * out_head_stride + dims,
            out.to(out_ptr.dtype.element_ty),
            mask=dims < D,
        )

    return {"partial": partial, "merge": merge}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    paged: PagedDecode,
    scale: float,
) -> torch.Tensor:
    """Attention of one query row per sequence over its paged keys.

    q: ``[Hq, B, D]`` (any strides with unit stride along D); k_cache, v_cache: one layer's
    ``[Hkv, num_slots, D]`` (same strides). Returns ``[Hq, B, D]`` (a view of a ``[B, Hq,
    D]`` tensor, the layout the output projection reads)."""
    partial, merge = _kernels()
    hq, batch, d = q.shape
    hkv = k_cache.shape[0]
    g = hq // hkv
    splits = paged.splits
    d_pad = _pow2(d)
    parts = torch.empty(batch, hq, splits, d_pad, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, hq, d, dtype=q.dtype, device=q.device)
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    partial[(batch, hkv, splits)](  # type: ignore[index]
        q,
        k_cache,
        v_cache,
        paged.tables,
        paged.lens,
        parts,
        lse,
        q.stride(1),
        q.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        paged.tables.stride(0),
        scale,
        hq,
        G=g,
        G_PAD=max(16, _pow2(g)),
        D=d,
        D_PAD=d_pad,
        PAGE=paged.block_size,
        BLOCK_N=64,
        SPLITS=splits,
        IEEE=q.dtype == torch.float32,
    )
    merge[(batch, hq)](  # type: ignore[index]
        parts, lse, out, out.stride(0), out.stride(1), hq, D=d, D_PAD=d_pad, SPLITS=splits
    )
    return out.transpose(0, 1)
