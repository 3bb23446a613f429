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
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores.

    q: ``[*B, Hq, n, D]``; k, v: ``[*B, Hkv, m, D]``; mask: bool ``[*B, n, m]`` (True = may
    attend) or None. Returns ``out [*B, Hq, n, D]`` and ``lse [*B, Hq, n]``. Every row must
    have at least one allowed key.
    """
    *lead, hq, n, d = q.shape
    hkv, m = k.shape[-3], k.shape[-2]
    g = hq // hkv
    qg = q.reshape(*lead, hkv, g * n, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale)  # [*B, Hkv, g*n, m]
    if mask is not None:
        scores = scores.view(*lead, hkv, g, n, m)
        scores.masked_fill_(~mask.unsqueeze(-3).unsqueeze(-3), float("-inf"))
        scores = scores.view(*lead, hkv, g * n, m)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores.sub_(lse))
    out = torch.matmul(probs, v)  # [*B, Hkv, g*n, D]
    return out.view(*lead, hq, n, d), lse.view(*lead, hq, n)


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
    mask: torch.Tensor  # [n, m] bool: row i may read suffix key j


@dataclass
class GroupAttention:
    """Sequences sharing a cached segment: all their rows read ``slots`` once, unmasked."""

    rows: torch.Tensor  # [r] rows of the flat batch belonging to the group's members
    slots: torch.Tensor  # [s] cache slots of the shared segment


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward; built once per step, read by every layer.

    Invariant: each flat-batch row is covered by exactly one suffix entry (``single_*`` or a
    ``SeqAttention``) and by at most one group; a group's segment lies before all its rows.
    """

    kv_cache: torch.Tensor  # [L, 2, Hkv, num_slots, D]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_rows: int
    single_rows: torch.Tensor | None  # [B1] rows of one-query sequences (decode)
    single_slots: torch.Tensor | None  # [B1, M] their suffix slots, padded
    single_mask: torch.Tensor | None  # [B1, 1, M] bool, False on padding
    seqs: list[SeqAttention]
    groups: list[GroupAttention]


def prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for the flat batch. q: ``[Hq, T, D]`` -> ``[Hq, T, D]``."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=q.dtype, device=q.device)
    if meta.single_rows is not None:
        qs = q.index_select(1, meta.single_rows).transpose(0, 1).unsqueeze(2)  # [B1, Hq, 1, D]
        ks = k_cache[:, meta.single_slots].transpose(0, 1)  # [B1, Hkv, M, D]
        vs = v_cache[:, meta.single_slots].transpose(0, 1)
        o, l_ = attend(qs, ks, vs, scale, meta.single_mask)
        out.index_copy_(1, meta.single_rows, o.squeeze(2).transpose(0, 1))
        lse.index_copy_(1, meta.single_rows, l_.squeeze(2).transpose(0, 1))
    for s in meta.seqs:
        ks = k_cache.index_select(1, s.slots)
        vs = v_cache.index_select(1, s.slots)
        out[:, s.rows], lse[:, s.rows] = attend(q[:, s.rows], ks, vs, scale, s.mask)
    for g in meta.groups:
        ks = k_cache.index_select(1, g.slots)
        vs = v_cache.index_select(1, g.slots)
        og, lg = attend(q.index_select(1, g.rows), ks, vs, scale)
        om, _ = merge(out.index_select(1, g.rows), lse.index_select(1, g.rows), og, lg)
        out.index_copy_(1, g.rows, om)
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
