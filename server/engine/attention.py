"""Shared-prefix attention over the paged KV cache (PyTorch reference).

A step's tokens form one flat, unpadded batch. Every sequence reads its KV from the cache:
an optional *shared* segment (blocks it has in common with the other members of its group) and
its *own* suffix. Following Hydragen, the group's queries attend to the shared segment in one
matrix product (non-causal: every query sits after the segment), each sequence attends to its
own suffix (causal), and the two partial results are merged by their log-sum-exp. The result
equals plain causal attention over the concatenation; ``tests/unit/test_attention.py`` checks it.

Cache layout: ``kv_cache[layer, 0 | 1]`` is ``[kv_heads, num_slots, head_dim]``, slot =
``block_id * block_size + offset``. Query heads are grouped GQA-style: query head ``h`` reads kv
head ``h // (q_heads // kv_heads)``, as transformers' ``repeat_kv`` does.
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
class GroupBatch:
    """All groups of the step, padded into one batch. Group ``g`` is a set of sequences
    sharing a cached segment; all their query rows read it once, unmasked (the segment lies
    before every one of them).

    ``q_index[g * q_len + j]`` is the flat-batch row of the group's j-th query (padding points
    at row 0); ``valid`` lists the padded positions that are real queries and ``rows`` the
    flat-batch row of each, in the same order.
    """

    q_len: int
    q_index: torch.Tensor  # [G * q_len]
    valid: torch.Tensor  # [R]
    rows: torch.Tensor  # [R]
    slots: torch.Tensor  # [G, S] shared-segment slots, padded
    hidden: torch.Tensor  # [G, 1, S] True on padding


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward; built once per step, read by every layer.

    Invariant: each flat-batch row is covered by exactly one suffix entry (``single_*`` or a
    ``SeqAttention``) and by at most one group.
    """

    kv_cache: torch.Tensor  # [L, 2, Hkv, num_slots, D]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_rows: int
    single_rows: torch.Tensor | None  # [B1] rows of one-query sequences (decode)
    single_slots: torch.Tensor | None  # [B1, M] their suffix slots, padded
    single_hidden: torch.Tensor | None  # [B1, 1, M] True on padding
    seqs: list[SeqAttention]
    groups: GroupBatch | None


def pad_slots(lists: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack slot lists into ``[N, max_len]`` (padding with slot 0) and a ``[N, 1, max_len]``
    mask that is True on the padding."""
    width = max(len(x) for x in lists)
    slots = torch.zeros(len(lists), width, dtype=torch.long, device=device)
    hidden = torch.ones(len(lists), 1, width, dtype=torch.bool, device=device)
    for i, x in enumerate(lists):
        slots[i, : len(x)] = x
        hidden[i, 0, : len(x)] = False
    return slots, hidden


def group_batch(groups: list[tuple[list[int], torch.Tensor]], device) -> GroupBatch:
    """Pack groups given as (flat-batch rows of all members' queries, shared-segment slots)."""
    q_len = max(len(rows) for rows, _ in groups)
    q_index = torch.zeros(len(groups) * q_len, dtype=torch.long)
    valid, all_rows = [], []
    for g, (rows, _) in enumerate(groups):
        q_index[g * q_len : g * q_len + len(rows)] = torch.tensor(rows)
        valid.extend(range(g * q_len, g * q_len + len(rows)))
        all_rows.extend(rows)
    slots, hidden = pad_slots([s for _, s in groups], device)
    return GroupBatch(
        q_len=q_len,
        q_index=q_index.to(device),
        valid=torch.tensor(valid, device=device),
        rows=torch.tensor(all_rows, device=device),
        slots=slots,
        hidden=hidden,
    )


def prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for the flat batch. q: ``[Hq, T, D]`` -> ``[Hq, T, D]``."""
    hq, _, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=q.dtype, device=q.device)
    if meta.single_rows is not None:
        b1, width = meta.single_slots.shape
        flat = meta.single_slots.view(-1)
        ks = k_cache.index_select(1, flat).view(-1, b1, width, d)  # [Hkv, B1, M, D]
        vs = v_cache.index_select(1, flat).view(-1, b1, width, d)
        qs = q.index_select(1, meta.single_rows).unsqueeze(2)  # [Hq, B1, 1, D]
        o, l_ = attend(qs, ks, vs, scale, meta.single_hidden)
        out.index_copy_(1, meta.single_rows, o.squeeze(2))
        lse.index_copy_(1, meta.single_rows, l_.squeeze(2))
    for s in meta.seqs:
        ks = k_cache.index_select(1, s.slots)
        vs = v_cache.index_select(1, s.slots)
        out[:, s.rows], lse[:, s.rows] = attend(q[:, s.rows], ks, vs, scale, s.hidden)
    gb = meta.groups
    if gb is not None:
        n_groups, width = gb.slots.shape
        flat = gb.slots.view(-1)
        ks = k_cache.index_select(1, flat).view(-1, n_groups, width, d)  # [Hkv, G, S, D]
        vs = v_cache.index_select(1, flat).view(-1, n_groups, width, d)
        qg = q.index_select(1, gb.q_index).view(hq, n_groups, gb.q_len, d)
        og, lg = attend(qg, ks, vs, scale, gb.hidden)  # [Hq, G, q_len, D], [Hq, G, q_len]
        og = og.reshape(hq, -1, d).index_select(1, gb.valid)
        lg = lg.reshape(hq, -1).index_select(1, gb.valid)
        merged, _ = merge(out.index_select(1, gb.rows), lse.index_select(1, gb.rows), og, lg)
        out.index_copy_(1, gb.rows, merged)
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
    k_cache.index_copy_(1, meta.slot_mapping, key[0])
    v_cache.index_copy_(1, meta.slot_mapping, value[0])
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = prefix_attention(query[0], k_cache, v_cache, meta, scale)
    return out.transpose(0, 1).unsqueeze(0), None


def register() -> None:
    """Make ``ATTENTION_NAME`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    # Masks come from our metadata, so the model must not build one.
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)
