"""Shared-prefix attention over the paged KV cache.

A step's tokens form one flat, unpadded batch. Every sequence reads its KV from the cache:
an optional *shared* segment (blocks it has in common with the other members of its group) and
its *own* suffix. Following Hydragen, the group's queries read the shared segment once, in one
matrix product per group, not once per sequence:

- multi-row chunks (prefill) attend causally to their suffix, and all of a group's rows
  attend to its segment (non-causal: every row sits after it); the two partial results are
  merged by their log-sum-exp;
- one-row chunks (decode) of a group form one unit whose keys are the segment, read once,
  followed by every member's suffix, each query masked to the segment and its own suffix: a
  single softmax, complete, no merge needed.

The metadata comes from the step's flat arrays (``server.engine.flat``, what a fused kernel
would take) in one numpy pass per step (``attention_metadata.py``); each layer then runs a
few padded batches (decode units, one per size class of multi-row chunks, shared segments),
whatever the number of sequences. Three backends compute the batches
(``attention_metadata.BACKENDS``): ``native``, a C kernel that
reads each unit's keys and values where they lie in the paged cache (``native.py``,
``paged_attention.c``; the CPU's default where it builds); ``fused``, torch's flash kernel
over keys and values gathered out of the cache; ``reference``, plain torch products
(``attend``), the test oracle. Everything equals plain causal attention over each
sequence's keys; ``tests/unit/test_attention.py`` and ``tests/unit/test_native_attention.py``
check it. Cache layout:
``kv_cache[layer, 0 | 1]`` is ``[kv_heads, num_slots, head_dim]``, slot = ``block_id *
block_size + offset``. Query heads are grouped GQA-style: query head ``h`` reads kv head
``h // (q_heads // kv_heads)``, as transformers' ``repeat_kv`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from server.engine import cpu_layers, native
from server.engine.attention_metadata import AttentionMetadata, PaddedBatch

ATTENTION_NAME = "prefix_serve"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores.

    Heads lead: q ``[Hq, *B, n, D]``; k, v ``[Hkv, *B, m, D]``; hidden: bool
    ``[*B, n | 1, m]``, True where a query must NOT see a key, or None. Returns
    ``out [Hq, *B, n, D]`` and float32 ``lse [Hq, *B, n]``. Every row must see at least one key.
    Keeping heads first lets the cache gathers (``index_select`` on the slot dimension) feed the
    matrix products without copies.
    """
    hq, *lead, n, d = q.shape
    hkv, m = k.shape[0], k.shape[-2]
    g = hq // hkv
    # Query head h reads kv head h // g: fold the g query heads of a kv head into its rows.
    qg = (q * scale).view(hkv, g, *lead, n, d).movedim(1, -3).reshape(hkv, *lead, g * n, d)
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [Hkv, *B, g*n, m]
    if hidden is not None:
        scores = scores.view(hkv, *lead, g, n, m)
        scores.masked_fill_(hidden.unsqueeze(-3), float("-inf"))
        scores = scores.view(hkv, *lead, g * n, m)
    # Softmax by hand: one exp pass gives both the weights and the log-sum-exp.
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, v).div_(total)  # [Hkv, *B, g*n, D]
    lse = total.float().log_().add_(top.float())  # float32 whatever q's dtype: see merge
    out = out.view(hkv, *lead, g, n, d).movedim(-3, 1).reshape(hq, *lead, n, d)
    lse = lse.view(hkv, *lead, g, n).movedim(-2, 1).reshape(hq, *lead, n)
    return out, lse


def merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention results over disjoint key sets into the result over their union.

    The log-sum-exps are float32 (both backends return them so): in bfloat16 an LSE near 10 is
    rounded by up to 0.03, which would scale the two halves' weights by up to 3% apiece."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    return o1 * w1 + o2 * w2, lse


def _gather(cache: torch.Tensor, pb: PaddedBatch) -> torch.Tensor:
    """The keys (or values) of ``pb``'s units from one layer's ``cache [Hkv, num_slots, D]``:
    ``[Hkv, U, S, D]``. Gathered as whole rows of the cache seen as a matrix (one index per
    head and slot), which torch copies row by row; ``index_select`` on the slot dimension of
    the 3-D cache takes a slower strided path."""
    hkv, _, d = cache.shape
    n_units, width = pb.slots.shape
    if pb.cache_rows is None or not cache.is_contiguous():
        return cache.index_select(1, pb.slots.view(-1)).view(hkv, n_units, width, d)
    return cache.view(-1, d).index_select(0, pb.cache_rows).view(hkv, n_units, width, d)


def _attend_padded(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pb: PaddedBatch, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``pb``'s units: ``out [Hq, R, D]`` and ``lse [Hq, R]`` for ``pb.rows``."""
    hq, _, d = q.shape
    n_units = pb.slots.shape[0]
    ks = _gather(k_cache, pb)  # [Hkv, U, S, D]
    vs = _gather(v_cache, pb)
    qu = q.index_select(1, pb.q_index).view(hq, n_units, pb.q_len, d)
    o, lse = attend(qu, ks, vs, scale, pb.hidden)  # [Hq, U, q_len, D], [Hq, U, q_len]
    o = o.reshape(hq, -1, d).index_select(1, pb.valid)
    return o, lse.reshape(hq, -1).index_select(1, pb.valid)


def _fused_kernel(device: torch.device) -> Callable[..., Any] | None:
    """torch's fused attention that also returns the log-sum-exp, for ``device``: on the CPU
    the flash kernel (``[B, H, L, D]`` in, ``(out, lse)`` out, additive mask allowed)."""
    if device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return None


def _fused_bias(pb: PaddedBatch, g: int, dtype: torch.dtype) -> torch.Tensor:
    """``pb.hidden`` as the additive mask of the fused kernel, with the g query heads of a kv
    head folded into the query rows (head-major: row ``i * q_len + j`` is head i, query j)."""
    if pb.bias is None or pb.bias.dtype != dtype:
        hidden = pb.hidden  # [U, q_len | 1, S]
        if hidden.shape[1] > 1 and g > 1:
            hidden = hidden.repeat(1, g, 1)
        bias = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
        pb.bias = bias.masked_fill_(hidden, float("-inf")).unsqueeze(1)
    return pb.bias


def _attend_fused(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pb: PaddedBatch, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_attend_padded`` through the fused kernel: one call for every unit and head. GQA
    without copying K/V per query head: the g query heads of kv head h become g x q_len query
    rows of h, all seeing the same keys."""
    hq, _, d = q.shape
    hkv = k_cache.shape[0]
    g = hq // hkv
    n_units = pb.slots.shape[0]
    ks = _gather(k_cache, pb).transpose(0, 1)  # [U, Hkv, S, D]
    vs = _gather(v_cache, pb).transpose(0, 1)
    qu = q.index_select(1, pb.q_index).view(hkv, g, n_units, pb.q_len, d)
    qu = qu.permute(2, 0, 1, 3, 4).reshape(n_units, hkv, g * pb.q_len, d)
    kernel = _fused_kernel(q.device)
    assert kernel is not None, "prefix_attention picks the fused path only with a kernel"
    out, lse = kernel(qu, ks, vs, attn_mask=_fused_bias(pb, g, q.dtype), scale=scale)
    # [U, Hkv, g * q_len, D] -> [Hq, U * q_len, D], rows of pb.valid only
    out = out.reshape(n_units, hq, pb.q_len, d).transpose(0, 1).reshape(hq, -1, d)
    lse = lse.reshape(n_units, hq, pb.q_len).transpose(0, 1).reshape(hq, -1)
    return out.index_select(1, pb.valid), lse.index_select(1, pb.valid).float()


def _attend_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pb: PaddedBatch,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> None:
    """``pb``'s units through the native kernel, reading keys and values where they lie in
    the cache (no gather): each real query's result goes straight to its row of ``out``
    (``[Hq, T, D]``, q's layout) and, when given, its log-sum-exp to ``lse`` (float32
    ``[Hq, T]``, contiguous)."""
    job = pb.native_job
    if job is None:
        dest = torch.full((pb.q_index.numel(),), -1, dtype=torch.int64)
        dest[pb.valid] = pb.rows
        hidden = pb.hidden
        job = native.Job(
            slots=pb.slots.data_ptr(),
            width=pb.slots.shape[1],
            hidden=hidden.data_ptr(),
            hidden_unit_stride=hidden.stride(0),
            hidden_query_stride=hidden.stride(1) if hidden.shape[1] > 1 else 0,
            q_index=pb.q_index.data_ptr(),
            dest=dest.data_ptr(),
            q_len=pb.q_len,
            units=pb.slots.shape[0],
            threads=torch.get_num_threads(),
        )
        pb.native_job, pb.dest = job, dest
    job.q, job.q_head_stride, job.q_row_stride = q.data_ptr(), q.stride(0), q.stride(1)
    job.k, job.v, job.cache_head_stride = k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0)
    job.out, job.out_head_stride, job.out_row_stride = out.data_ptr(), out.stride(0), out.stride(1)
    job.lse = lse.data_ptr() if lse is not None else None
    job.lse_head_stride = lse.stride(0) if lse is not None else 0
    job.q_heads, job.kv_heads, job.head_dim = q.shape[0], k_cache.shape[0], q.shape[2]
    job.scale, job.bf16 = scale, int(q.dtype == torch.bfloat16)
    native.run(job)


def prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for the flat batch. q: ``[Hq, T, D]`` -> ``[Hq, T, D]``."""
    attend_into = _batch_runner(meta.backend, q, k_cache, v_cache, scale)
    out = torch.empty_like(q)
    if meta.decode is not None:
        attend_into(meta.decode, out, None)
    # Shared-segment rows are suffix rows too: keep the suffix LSEs for their merge.
    full_lse = None
    if meta.shared is not None:
        full_lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for pb in meta.suffix:
        attend_into(pb, out, full_lse)
    if meta.shared is None or full_lse is None:
        return out
    rows = meta.shared.rows
    shared_out = torch.empty_like(q)
    shared_lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    attend_into(meta.shared, shared_out, shared_lse)
    merged, _ = merge(
        out.index_select(1, rows),
        full_lse.index_select(1, rows),
        shared_out.index_select(1, rows),
        shared_lse.index_select(1, rows),
    )
    out.index_copy_(1, rows, merged.to(out.dtype))
    return out


# Attention of one padded batch, written into its rows of ``out [Hq, T, D]`` and, when given,
# of a float32 ``lse [Hq, T]``.
_BatchRunner = Callable[[PaddedBatch, torch.Tensor, torch.Tensor | None], None]


def _batch_runner(
    backend: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
) -> _BatchRunner:
    """How this layer's batches are computed: the native kernel writes rows in place; torch's
    backends compute each batch's rows, then scatter them."""
    if backend == "native" and _native_fits(q, k_cache, v_cache):
        return lambda pb, out, lse: _attend_native(q, k_cache, v_cache, pb, scale, out, lse)
    fused = backend != "reference" and _fused_kernel(q.device) is not None
    attend_batch = _attend_fused if fused else _attend_padded

    def attend_into(pb: PaddedBatch, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        o, batch_lse = attend_batch(q, k_cache, v_cache, pb, scale)
        out.index_copy_(1, pb.rows, o)
        if lse is not None:
            lse.index_copy_(1, pb.rows, batch_lse)

    return attend_into


def _native_fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the native kernel can read these tensors as they are: CPU memory, one storage
    type it knows, unit stride along the head dimension, caches laid out as allocated (the
    runner settles the backend once; this guards what reaches the kernel's raw pointers)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and k_cache.dtype == q.dtype == v_cache.dtype
        and q.stride(-1) == 1
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry point: write the step's K/V, then attend.

    query: ``[1, Hq, T, D]`` post-RoPE; key/value ``[1, Hkv, T, D]``. Returns ``[1, T, Hq, D]``.
    """
    meta: AttentionMetadata = kwargs["ps_meta"]
    layer = int(module.layer_idx)  # type: ignore[arg-type]  # transformers sets it untyped
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = write_and_attend(meta, layer, query[0], key[0], value[0], scale)
    return out.transpose(0, 1).unsqueeze(0), None


def write_and_attend(
    meta: AttentionMetadata,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One layer's attention for the flat batch: write the step's keys and values (``[Hkv, T,
    D]``, post-RoPE) into the layer's cache, zeroing and flagging rows that are not finite,
    then attend. query: ``[Hq, T, D]`` -> ``[Hq, T, D]``."""
    k_cache = meta.kv_cache[layer, 0]
    v_cache = meta.kv_cache[layer, 1]
    if meta.backend == "native" and cpu_layers.write_kv(
        key, value, k_cache, v_cache, meta.slot_mapping, meta.nonfinite
    ):
        return prefix_attention(query, k_cache, v_cache, meta, scale)
    if not _all_finite(key, value):
        bad = ~(_finite_rows(key) & _finite_rows(value))
        meta.nonfinite |= bad
        key = key.masked_fill(bad[None, :, None], 0.0)
        value = value.masked_fill(bad[None, :, None], 0.0)
    k_cache.index_copy_(1, meta.slot_mapping, key)
    v_cache.index_copy_(1, meta.slot_mapping, value)
    return prefix_attention(query, k_cache, v_cache, meta, scale)


def _all_finite(k: torch.Tensor, v: torch.Tensor) -> bool:
    """True only if every value of ``k`` and ``v`` is finite, from two sums (an inf or NaN
    carries into a sum): on the CPU, where reading the answer costs nothing, this spares the
    per-row check in the common case. False means "check row by row" (a sum of finite values
    can overflow), and is always the answer on other devices, where reading it would stall
    the step until the device catches up."""
    if k.device.type != "cpu":
        return False
    return math.isfinite(float(k.sum(dtype=torch.float32) + v.sum(dtype=torch.float32)))


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[Hkv, T, D] -> [T] bool: every value of the row is finite."""
    return torch.isfinite(x).all(dim=2).all(dim=0)


def register() -> None:
    """Make ``ATTENTION_NAME`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    # Masks come from our metadata, so the model must not build one.
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)
