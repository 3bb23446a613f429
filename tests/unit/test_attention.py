"""Shared-prefix attention equals plain causal attention (fp32, 1e-5)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from server.engine.attention import (
    _gather,
    attend,
    merge,
    paged_attention_forward,
    prefix_attention,
)
from server.engine.attention_metadata import build_metadata
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


@pytest.mark.parametrize("backend", ["reference", "fused", "native"])
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


def _one_step(cache: torch.Tensor, n: int) -> tuple[object, list[int]]:
    """Metadata for ``n`` one-row chunks (positions 0) in blocks 0..n-1 of ``cache``."""
    chunks = []
    for i in range(n):
        seq = Sequence(f"s{i}", "t", [1], [], SamplingParams(), 0.0)
        seq.block_table = [i]
        chunks.append(Chunk(seq, 0, 1))
    plan = build_plan(chunks, 4)
    return build_metadata(flatten(plan), cache, "cpu"), [i * 4 for i in range(n)]


def test_gather_reads_the_same_keys_from_a_strided_cache():
    """Units' keys come out of a contiguous cache as rows of one matrix, and out of any other
    layout by slot; both give the keys of ``slots``, head by head."""
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(1, 2, HKV, 16, D, generator=g)
    meta, _ = _one_step(cache, 3)
    pb = meta.decode
    want = cache[0, 0][:, pb.slots.view(-1)].view(HKV, *pb.slots.shape, D)
    assert torch.equal(_gather(cache[0, 0], pb), want)
    strided = cache[0, 0].transpose(0, 1).contiguous().transpose(0, 1)  # same values
    assert not strided.is_contiguous()
    assert torch.equal(_gather(strided, pb), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_writes_zero_only_the_rows_that_are_not_finite(dtype: torch.dtype):
    """A row whose K or V holds an inf or NaN is written as zeros and flagged; rows of large
    finite values (whose sum overflows) are written as they are and not flagged."""
    big = torch.finfo(dtype).max
    cache = torch.zeros(1, 2, HKV, 16, D, dtype=dtype)
    meta, slots = _one_step(cache, 4)
    key = torch.ones(1, HKV, 4, D, dtype=dtype)
    value = torch.ones(1, HKV, 4, D, dtype=dtype)
    key[0, :, 0] = big  # finite, sums to inf
    value[0, 1, 1, 3] = float("nan")
    key[0, 0, 2, 0] = float("-inf")
    query = torch.zeros(1, HQ, 4, D, dtype=dtype)
    paged_attention_forward(SimpleNamespace(layer_idx=0), query, key, value, None, ps_meta=meta)
    assert meta.nonfinite.tolist() == [False, True, True, False]
    assert torch.equal(cache[0, 0][:, slots[0]], key[0, :, 0])
    assert torch.equal(cache[0, 0][:, slots[3]], key[0, :, 3])
    for row in (1, 2):
        assert not cache[0, :, :, slots[row]].any()
    # All finite: nothing flagged, everything written as given.
    meta, slots = _one_step(cache, 2)
    paged_attention_forward(
        SimpleNamespace(layer_idx=0),
        query[:, :, :2],
        torch.full((1, HKV, 2, D), 3.0, dtype=dtype),
        torch.full((1, HKV, 2, D), 3.0, dtype=dtype),
        None,
        ps_meta=meta,
    )
    assert meta.nonfinite.tolist() == [False, False]
    assert bool((cache[0, :, :, slots] == 3).all())


@pytest.mark.parametrize("backend", ["reference", "fused", "native"])
@pytest.mark.parametrize(
    "cases",
    [
        # Two groups of two: full units, rows in order (nothing selected or scattered).
        [([0, 1, 5], 11, 10), ([0, 1, 6], 10, 9), ([2, 3, 7], 12, 11), ([2, 3, 8], 9, 8)],
        # A group of three and a loner: the loner's unit is padded to three queries.
        [([0, 1, 5], 11, 10), ([0, 1, 6], 10, 9), ([0, 1, 9], 12, 11), ([4, 8], 7, 6)],
        # A loner before a group: units are not in row order.
        [([4, 8], 7, 6), ([0, 1, 5], 11, 10), ([0, 1, 6], 10, 9)],
    ],
)
def test_decode_only_steps_equal_plain_attention(backend: str, cases: list) -> None:
    """Steps made only of one-row chunks, laid out the ways that decide whether attention can
    hand its result back as it is (full units in row order) or must select and scatter."""
    g = torch.Generator().manual_seed(7)
    bs = 4
    cache = torch.randn(1, 2, HKV, 16 * bs, D, generator=g)
    chunks = []
    for i, (table, total, qpos) in enumerate(cases):
        seq = Sequence(f"s{i}", "t", list(range(total)), [], SamplingParams(), 0.0)
        seq.block_table = list(table)
        chunks.append(Chunk(seq, qpos, total))
    plan = build_plan(chunks, bs)
    meta = build_metadata(flatten(plan), cache, "cpu", backend)
    assert meta.decode is not None and not meta.suffix and meta.shared is None
    q = torch.randn(HQ, plan.num_rows, D, generator=g)
    out = prefix_attention(q, cache[0, 0], cache[0, 1], meta, 1 / math.sqrt(D))
    for i, (table, total, qpos) in enumerate(cases):
        t, p = torch.tensor(table), torch.arange(total)
        s = t[p // bs] * bs + p % bs
        want = plain_attention(
            q[:, [i]], cache[0, 0][:, s], cache[0, 1][:, s], [qpos], 1 / math.sqrt(D)
        )
        assert (out[:, [i]] - want).abs().max() < 1e-5, i
