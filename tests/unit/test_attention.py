"""Shared-prefix attention equals plain causal attention (fp32, 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.attention import attend, build_metadata, merge, prefix_attention
from server.engine.batch import Chunk, SharedGroup, build_plan
from server.engine.flat import flatten
from server.engine.request import SamplingParams, Sequence

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


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_paged_batch_equals_plain_attention(backend: str, dtype: torch.dtype):
    """Two groups and a loner, one-row (decode) and multi-row chunks mixed, laid out by the
    scheduler's own plan builder. Group 0: three sequences sharing blocks 0, 1 (8 tokens);
    group 1: two sharing block 3 (4 tokens). One-row chunks form decode units (segment once +
    every member's suffix, masked); multi-row chunks attend to their suffix and to their
    group's segment, merged by LSE. Blocks are scattered through the pool to exercise the slot
    arithmetic. Both backends; bfloat16 against the float32 textbook result of the same
    (rounded) inputs, within bfloat16's resolution."""
    g = torch.Generator().manual_seed(2)
    bs, num_blocks = 4, 16
    cache = torch.randn(1, 2, HKV, num_blocks * bs, D, generator=g).to(dtype)
    scale = 1 / math.sqrt(D)
    # (block table, length after this step, query positions this step)
    cases = [
        ([0, 1, 5, 9], 14, [13]),
        ([0, 1, 7], 12, [9, 10, 11]),
        ([0, 1, 2], 10, [9]),
        ([3, 4, 6], 11, [10]),
        ([3, 11, 8, 10], 15, [12, 13, 14]),
        ([12, 13], 6, [5]),
        ([14, 15], 8, [2, 3, 4, 5, 6, 7]),  # a loner of 6 rows: a size class of its own
    ]
    chunks = []
    for i, (table, total, qpos) in enumerate(cases):
        seq = Sequence(f"s{i}", "t", list(range(total)), [], SamplingParams(), 0.0)
        seq.block_table = list(table)
        chunks.append(Chunk(seq, qpos[0], total))
    plan = build_plan(chunks, bs)
    assert plan.groups == (SharedGroup(2, (0, 1, 2)), SharedGroup(1, (3, 4)))
    assert plan.group_of == (0, 0, 0, 1, 1, -1, -1)
    meta = build_metadata(flatten(plan), cache, "cpu", backend)
    assert meta.decode.slots.shape == (3, 8 + 6 + 2)  # group 0: segment + two suffixes
    # Multi-row chunks by size class: chunks 1 and 4 (3 rows each), then chunk 6 (6 rows).
    assert [pb.rows.tolist() for pb in meta.suffix] == [
        list(range(plan.row_starts[1], plan.row_starts[2]))
        + list(range(plan.row_starts[4], plan.row_starts[5])),
        list(range(plan.row_starts[6], plan.row_starts[7])),
    ]
    q = torch.randn(HQ, plan.num_rows, D, generator=g).to(dtype)
    out = prefix_attention(q, cache[0, 0], cache[0, 1], meta, scale)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    q, cache, out = q.float(), cache.float(), out.float()
    for i, (table, total, qpos) in enumerate(cases):
        rows = list(range(plan.row_starts[i], plan.row_starts[i + 1]))
        t = torch.tensor(table)
        p = torch.arange(total)
        s = t[p // bs] * bs + p % bs
        expect = plain_attention(q[:, rows], cache[0, 0][:, s], cache[0, 1][:, s], qpos, scale)
        err = (out[:, rows] - expect).abs().max()
        assert err < tol, (table, err)
