"""Shared-prefix attention equals plain causal attention (fp32, 1e-5)."""

from __future__ import annotations

import math

import torch

from server.engine.attention import (
    AttentionMetadata,
    GroupAttention,
    SeqAttention,
    attend,
    merge,
    prefix_attention,
)

HQ, HKV, D = 6, 2, 8


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos, scale):
    """Textbook causal attention: query at absolute position p reads keys 0..p."""
    k = k.repeat_interleave(HQ // HKV, dim=0)
    v = v.repeat_interleave(HQ // HKV, dim=0)
    scores = q @ k.transpose(-1, -2) * scale
    kpos = torch.arange(k.shape[1])
    mask = kpos[None, :] <= torch.tensor(qpos)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_attend_lse_matches_definition():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, n, D, generator=g) for h, n in ((HQ, 3), (HKV, 5), (HKV, 5)))
    out, lse = attend(q, k, v, 0.5)
    kk = k.repeat_interleave(3, dim=0)
    scores = q @ kk.transpose(-1, -2) * 0.5
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-6)
    assert torch.allclose(out, torch.softmax(scores, -1) @ v.repeat_interleave(3, 0), atol=1e-6)


def test_merge_of_two_halves_is_whole():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(HQ, 4, D, generator=g)
    k, v = torch.randn(HKV, 10, D, generator=g), torch.randn(HKV, 10, D, generator=g)
    whole, lse = attend(q, k, v, 0.3)
    a = attend(q, k[:, :6], v[:, :6], 0.3)
    b = attend(q, k[:, 6:], v[:, 6:], 0.3)
    merged, mlse = merge(*a, *b)
    assert torch.allclose(merged, whole, atol=1e-6)
    assert torch.allclose(mlse, lse, atol=1e-6)


def test_grouped_paged_batch_equals_plain_attention():
    """Three sequences share an 8-token cached segment (blocks 0, 1); two decode one token,
    one computes a 3-token chunk; a fourth, unrelated sequence decodes alone. Blocks are
    scattered through the pool to exercise the slot arithmetic."""
    g = torch.Generator().manual_seed(2)
    bs, num_blocks = 4, 12
    cache = torch.randn(1, 2, HKV, num_blocks * bs, D, generator=g)
    scale = 1 / math.sqrt(D)
    # (block table, total length after this step, query positions this step)
    seqs = [
        ([0, 1, 5, 9], 14, [13]),
        ([0, 1, 7], 12, [9, 10, 11]),
        ([0, 1, 2], 10, [9]),
        ([3, 4, 6], 11, [10]),
    ]

    def slots(table, positions):
        t = torch.tensor(table)
        p = torch.tensor(positions)
        return t[p // bs] * bs + p % bs

    rows_of = []
    q_all = []
    row = 0
    for _table, _total, qpos in seqs:
        rows_of.append(list(range(row, row + len(qpos))))
        row += len(qpos)
        q_all.append(torch.randn(HQ, len(qpos), D, generator=g))
    q = torch.cat(q_all, dim=1)
    shared = 8
    singles = [(0, 0), (2, 4), (3, 5)]  # (seq index, flat-batch row)
    single_slots = [
        slots(seqs[i][0], range(shared if i < 3 else 0, seqs[i][1])) for i, _ in singles
    ]
    width = max(len(s) for s in single_slots)
    pad = torch.zeros(len(singles), width, dtype=torch.long)
    mask = torch.zeros(len(singles), 1, width, dtype=torch.bool)
    for j, s in enumerate(single_slots):
        pad[j, : len(s)] = s
        mask[j, 0, : len(s)] = True
    table1, total1, qpos1 = seqs[1]
    kpos = torch.arange(shared, total1)
    meta = AttentionMetadata(
        kv_cache=cache,
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_rows=q.shape[1],
        single_rows=torch.tensor([r for _, r in singles]),
        single_slots=pad,
        single_mask=mask,
        seqs=[
            SeqAttention(
                slice(1, 4),
                slots(table1, range(shared, total1)),
                kpos[None, :] <= torch.tensor(qpos1)[:, None],
            )
        ],
        groups=[GroupAttention(torch.tensor([0, 1, 2, 3, 4]), slots([0, 1], range(shared)))],
    )
    out = prefix_attention(q, cache[0, 0], cache[0, 1], meta, scale)
    for (table, total, qpos), rows in zip(seqs, rows_of, strict=True):
        s = slots(table, range(total))
        expect = plain_attention(q[:, rows], cache[0, 0][:, s], cache[0, 1][:, s], qpos, scale)
        assert torch.allclose(out[:, rows], expect, atol=1e-5), (
            table,
            (out[:, rows] - expect).abs().max(),
        )
