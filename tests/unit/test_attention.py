"""Shared-prefix attention equals plain causal attention (fp32, 1e-5)."""

from __future__ import annotations

import math

import torch

from server.engine.attention import (
    AttentionMetadata,
    SeqAttention,
    attend,
    merge,
    padded_batch,
    prefix_attention,
)
from server.engine.model_runner import ModelRunner

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


def test_batched_masked_attend_equals_each_item():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(HQ, 2, 3, D, generator=g)
    k, v = torch.randn(HKV, 2, 5, D, generator=g), torch.randn(HKV, 2, 5, D, generator=g)
    hidden = torch.zeros(2, 3, 5, dtype=torch.bool)
    hidden[1, :, 3:] = True  # item 1 has only 3 real keys
    out, lse = attend(q, k, v, 0.5, hidden)
    for b, m in ((0, 5), (1, 3)):
        o, l_ = attend(q[:, b], k[:, b, :m], v[:, b, :m], 0.5)
        assert torch.allclose(out[:, b], o, atol=1e-6)
        assert torch.allclose(lse[:, b], l_, atol=1e-6)


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
    """Two groups and a loner, one-token (decode) and multi-token chunks mixed. Group 0: three
    sequences sharing blocks 0, 1 (8 tokens); group 1: two sharing block 3 (4 tokens).
    One-token chunks form decode units (segment once + every member's suffix, masked);
    multi-token chunks attend to their suffix and to their group's segment, merged by LSE.
    Blocks are scattered through the pool to exercise the slot arithmetic."""
    g = torch.Generator().manual_seed(2)
    bs, num_blocks = 4, 16
    cache = torch.randn(1, 2, HKV, num_blocks * bs, D, generator=g)
    scale = 1 / math.sqrt(D)
    # (block table, length after this step, query positions this step, shared tokens, group)
    seqs = [
        ([0, 1, 5, 9], 14, [13], 8, 0),
        ([0, 1, 7], 12, [9, 10, 11], 8, 0),
        ([0, 1, 2], 10, [9], 8, 0),
        ([3, 4, 6], 11, [10], 4, 1),
        ([3, 11, 8, 10], 15, [12, 13, 14], 4, 1),
        ([12, 13], 6, [5], 0, None),
    ]

    def slots(table, positions):
        t = torch.tensor(table)
        p = torch.tensor(list(positions))
        return t[p // bs] * bs + p % bs

    segment = {0: slots([0, 1], range(8)), 1: slots([3], range(4))}
    n_rows = sum(len(x[2]) for x in seqs)
    q = torch.randn(HQ, n_rows, D, generator=g)
    decode: dict[object, list[tuple[int, torch.Tensor]]] = {}
    multi: list[SeqAttention] = []
    shared_rows: dict[int, list[int]] = {0: [], 1: []}
    row = 0
    rows_of = []
    for i, (table, total, qpos, n_shared, group) in enumerate(seqs):
        rows = list(range(row, row + len(qpos)))
        rows_of.append(rows)
        row += len(qpos)
        suffix = slots(table, range(n_shared, total))
        if len(qpos) == 1:
            decode.setdefault(group if group is not None else f"alone-{i}", []).append(
                (rows[0], suffix)
            )
            continue
        kpos = torch.arange(n_shared, total)
        hidden = kpos[None, :] > torch.tensor(qpos)[:, None]
        multi.append(SeqAttention(slice(rows[0], rows[-1] + 1), suffix, hidden))
        shared_rows[group].extend(rows)
    units = []
    for key, members in decode.items():  # the runner's own unit builder
        units.append(ModelRunner._decode_unit(members, segment.get(key)))
    meta = AttentionMetadata(
        kv_cache=cache,
        slot_mapping=torch.empty(0, dtype=torch.long),
        decode=padded_batch(units, "cpu"),
        seqs=multi,
        shared=padded_batch([(shared_rows[i], segment[i], None) for i in (0, 1)], "cpu"),
        nonfinite=torch.zeros(0, dtype=torch.bool),
    )
    assert meta.decode.slots.shape == (3, 8 + 6 + 2)  # group 0: segment + two suffixes
    out = prefix_attention(q, cache[0, 0], cache[0, 1], meta, scale)
    for (table, total, qpos, _, _), rows in zip(seqs, rows_of, strict=True):
        s = slots(table, range(total))
        expect = plain_attention(q[:, rows], cache[0, 0][:, s], cache[0, 1][:, s], qpos, scale)
        err = (out[:, rows] - expect).abs().max()
        assert err < 1e-5, (table, err)
