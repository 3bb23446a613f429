"""Shared-prefix attention over the paged KV cache (PyTorch reference).

A step's tokens form one flat, unpadded batch. Every sequence reads its KV from the cache:
an optional *shared* segment (blocks it has in common with the other members of its group) and
its *own* suffix. Following Hydragen, the group's queries read the shared segment once, in one
matrix product per group, not once per sequence:

- multi-token chunks (prefill) attend causally to their suffix, and all of a group's queries
  attend to its segment (non-causal: every query sits after it); the two partial results are
  merged by their log-sum-exp;
- one-token chunks (decode) of a group form one unit whose keys are the segment, read once,
  followed by every member's suffix, each query masked to the segment and its own suffix: a
  single softmax, complete, no merge needed.

Both equal plain causal attention over the concatenation; ``tests/unit/test_attention.py``
checks it. Cache layout: ``kv_cache[layer, 0 | 1]`` is ``[kv_heads, num_slots, head_dim]``,
slot = ``block_id * block_size + offset``. Query heads are grouped GQA-style: query head ``h``
reads kv head ``h // (q_heads // kv_heads)``, as transformers' ``repeat_kv`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    ``out [Hq, *B, n, D]`` and ``lse [Hq, *B, n]``. Every row must see at least one key.
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
    lse = total.log_().add_(top)
    out = out.view(hkv, *lead, g, n, d).movedim(-3, 1).reshape(hq, *lead, n, d)
    lse = lse.view(hkv, *lead, g, n).movedim(-2, 1).reshape(hq, *lead, n)
    return out, lse


def merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention results over disjoint key sets into the result over their union."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    return o1 * w1 + o2 * w2, lse


@dataclass
class SeqAttention:
    """One multi-query sequence of the batch: its rows attend causally to ``slots``."""

    rows: slice  # its rows of the flat batch (contiguous)
    slots: torch.Tensor  # [m] cache slots of its own suffix, in position order
    hidden: torch.Tensor  # [n, m] bool: True where row i must not see suffix key j


@dataclass
class PaddedBatch:
    """Units of queries padded into one batch, each unit reading its own list of cache slots.

    Two uses. *Decode units*: a group of one-token sequences that share a cached segment (or
    one such sequence alone) reads the segment once plus every member's own suffix, ``hidden``
    keeping each query to its own suffix; the result is complete. *Shared segments*: the
    multi-token members of a group read the segment once, unmasked; the result is merged by
    log-sum-exp with their suffix attention.

    ``q_index[u * q_len + j]`` is the flat-batch row of unit u's j-th query (padding points at
    row 0); ``valid`` lists the padded positions that are real queries and ``rows`` the
    flat-batch row of each, in the same order.
    """

    q_len: int
    q_index: torch.Tensor  # [U * q_len]
    valid: torch.Tensor  # [R]
    rows: torch.Tensor  # [R]
    slots: torch.Tensor  # [U, S] padded with slot 0
    hidden: torch.Tensor  # [U, q_len | 1, S] True where a query must not see a key


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward; built once per step, read by every layer.

    Invariant: each flat-batch row is in exactly one of ``decode`` (complete) or ``seqs``
    (suffix); a ``seqs`` row is in at most one unit of ``shared``, whose segment lies before it.
    The cache holds finite values only: a row whose new K or V is not finite is written as
    zeros and flagged in ``nonfinite`` (a masked key's weight is exactly 0, but 0 x inf is NaN,
    so one request's overflow would otherwise reach every query of its decode unit and every
    unit padded with its slots).
    """

    kv_cache: torch.Tensor  # [L, 2, Hkv, num_slots, D]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: PaddedBatch | None
    seqs: list[SeqAttention]
    shared: PaddedBatch | None
    nonfinite: torch.Tensor  # [T] bool, or-ed over layers: the row's K/V was not finite


def padded_batch(
    units: list[tuple[list[int], torch.Tensor, torch.Tensor | None]], device
) -> PaddedBatch:
    """Pack units given as (flat-batch rows, cache slots, hidden ``[len(rows), len(slots)]``
    or None when every query sees every slot)."""
    q_len = max(len(rows) for rows, _, _ in units)
    width = max(len(slots) for _, slots, _ in units)
    per_query = any(h is not None for _, _, h in units)
    slots = torch.zeros(len(units), width, dtype=torch.long)
    hidden = torch.ones(len(units), q_len if per_query else 1, width, dtype=torch.bool)
    q_index = torch.zeros(len(units) * q_len, dtype=torch.long)
    valid, all_rows = [], []
    for u, (rows, unit_slots, unit_hidden) in enumerate(units):
        n, m = len(rows), len(unit_slots)
        slots[u, :m] = unit_slots
        hidden[u, :, :m] = False
        if unit_hidden is not None:
            hidden[u, :n, :m] = unit_hidden
        q_index[u * q_len : u * q_len + n] = torch.tensor(rows)
        valid.extend(range(u * q_len, u * q_len + n))
        all_rows.extend(rows)
    return PaddedBatch(
        q_len=q_len,
        q_index=q_index.to(device),
        valid=torch.tensor(valid, device=device),
        rows=torch.tensor(all_rows, device=device),
        slots=slots.to(device),
        hidden=hidden.to(device),
    )


def _attend_padded(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pb: PaddedBatch, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``pb``'s units: ``out [Hq, R, D]`` and ``lse [Hq, R]`` for ``pb.rows``."""
    hq, _, d = q.shape
    n_units, width = pb.slots.shape
    flat = pb.slots.view(-1)
    ks = k_cache.index_select(1, flat).view(-1, n_units, width, d)  # [Hkv, U, S, D]
    vs = v_cache.index_select(1, flat).view(-1, n_units, width, d)
    qu = q.index_select(1, pb.q_index).view(hq, n_units, pb.q_len, d)
    o, lse = attend(qu, ks, vs, scale, pb.hidden)  # [Hq, U, q_len, D], [Hq, U, q_len]
    o = o.reshape(hq, -1, d).index_select(1, pb.valid)
    return o, lse.reshape(hq, -1).index_select(1, pb.valid)


def prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for the flat batch. q: ``[Hq, T, D]`` -> ``[Hq, T, D]``."""
    out = torch.empty_like(q)
    if meta.decode is not None:
        o, _ = _attend_padded(q, k_cache, v_cache, meta.decode, scale)
        out.index_copy_(1, meta.decode.rows, o)
    if not meta.seqs:
        return out
    lse = torch.empty(q.shape[:2], dtype=q.dtype, device=q.device)
    for s in meta.seqs:
        ks = k_cache.index_select(1, s.slots)
        vs = v_cache.index_select(1, s.slots)
        out[:, s.rows], lse[:, s.rows] = attend(q[:, s.rows], ks, vs, scale, s.hidden)
    if meta.shared is not None:
        rows = meta.shared.rows
        og, lg = _attend_padded(q, k_cache, v_cache, meta.shared, scale)
        merged, _ = merge(out.index_select(1, rows), lse.index_select(1, rows), og, lg)
        out.index_copy_(1, rows, merged)
    return out


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry point: write the step's K/V, then attend.

    query: ``[1, Hq, T, D]`` post-RoPE; key/value ``[1, Hkv, T, D]``. Returns ``[1, T, Hq, D]``.
    """
    meta: AttentionMetadata = kwargs["ps_meta"]
    layer = module.layer_idx
    k_cache = meta.kv_cache[layer, 0]
    v_cache = meta.kv_cache[layer, 1]
    new_k, new_v = key[0], value[0]  # [Hkv, T, D]
    bad = ~(_finite_rows(new_k) & _finite_rows(new_v))
    meta.nonfinite |= bad
    k_cache.index_copy_(1, meta.slot_mapping, new_k.masked_fill(bad[None, :, None], 0.0))
    v_cache.index_copy_(1, meta.slot_mapping, new_v.masked_fill(bad[None, :, None], 0.0))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = prefix_attention(query[0], k_cache, v_cache, meta, scale)
    return out.transpose(0, 1).unsqueeze(0), None


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
