"""The GPU decode kernel (``engine/triton_attention.py``), run under Triton's interpreter on the
CPU, against the reference attention (``attention.attend``) over each sequence's keys."""

from __future__ import annotations

import pytest
import torch

from server.engine.attention import attend
from server.engine.triton_attention import PagedDecode, paged_decode, splits_for

pytestmark = pytest.mark.triton_interpreter


def _case(lens, hq, hkv, d, block_size, splits, seed=0, shared=0, round_bf16=False):
    """A paged cache whose sequences' blocks are scattered (and, for ``shared`` blocks, the
    same ids at the front of every table), queries ``[Hq, B, D]`` as the decoder lays them out
    (a transposed view), and the expected output from ``attend`` over gathered keys."""
    gen = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    common, perm = perm[:shared], perm[shared:]
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    for b, k in enumerate(need):
        own = [perm.pop() for _ in range(k - shared)]
        tables[b, :k] = torch.tensor(common + own, dtype=torch.int32)
    cache = torch.randn(2, hkv, num_blocks * block_size, d, generator=gen)
    q = torch.randn(len(lens), hq, d, generator=gen).transpose(0, 1)  # [Hq, B, D] view
    if round_bf16:  # inputs as a bfloat16 run holds them
        cache, q = cache.bfloat16().float(), q.bfloat16().float()
    want = []
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[b, pos // block_size].long() * block_size + pos % block_size
        o, _ = attend(
            q[:, b : b + 1].double(),
            cache[0][:, slots].double(),
            cache[1][:, slots].double(),
            d**-0.5,
        )
        want.append(o[:, 0])
    paged = PagedDecode(tables, torch.tensor(lens, dtype=torch.int32), block_size, splits)
    return q, cache, paged, torch.stack(want, dim=1)


CASES = [
    ((1, 17, 64, 130), 4, 2, 16, 16, 1, 0),  # one key, a partial block, whole blocks
    ((200, 5, 96), 6, 2, 32, 16, 4, 0),  # splits, some of them empty
    ((300, 300, 290), 9, 3, 64, 16, 2, 16),  # a shared segment of 16 blocks, SmolLM2 heads
    ((70, 33), 8, 8, 24, 8, 8, 0),  # no GQA, a head dimension padded to 32
]


@pytest.mark.parametrize(("lens", "hq", "hkv", "d", "block_size", "splits", "shared"), CASES)
def test_paged_decode_equals_reference_attention(lens, hq, hkv, d, block_size, splits, shared):
    q, cache, paged, want = _case(lens, hq, hkv, d, block_size, splits, shared=shared)
    got = paged_decode(q, cache[0], cache[1], paged, d**-0.5)
    assert got.shape == (hq, len(lens), d)
    assert got.transpose(0, 1).is_contiguous()  # the layout the output projection reads
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)


def test_splits_fill_the_programs_asked_for():
    assert splits_for(64, 8, 264) == 1
    assert splits_for(16, 8, 264) == 4  # 16 * 8 * 4 = 512 >= 264 > 256
    assert splits_for(1, 2, 264) == 16  # at most 16


def test_groups_read_their_segment_once_and_merge_with_each_members_own_keys():
    """Rows 0, 2, 3 share a 5-block segment, rows 1 and 4 a 2-block one, row 5 is alone; the
    segment/own split must give what attention over each row's whole key list gives."""
    gen = torch.Generator().manual_seed(7)
    bs, hq, hkv, d = 4, 8, 2, 32
    lens = [27, 9, 20, 23, 12, 5]
    seg = {0: 5, 2: 5, 3: 5, 1: 2, 4: 2}
    need = [(n + bs - 1) // bs for n in lens]
    perm = torch.randperm(80, generator=gen).tolist()
    common = {5: perm[:5], 2: perm[5:7]}
    rest = perm[7:]
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    for b, k in enumerate(need):
        front = common[seg[b]] if b in seg else []
        own = [rest.pop() for _ in range(k - len(front))]
        tables[b, :k] = torch.tensor(front + own, dtype=torch.int32)
    cache = torch.randn(2, hkv, 80 * bs, d, generator=gen)
    q = torch.randn(len(lens), hq, d, generator=gen).transpose(0, 1)
    # A third, unused group; rows 40 wide: three tiles of 16 members, two of them empty.
    members = torch.full((3, 40), -1, dtype=torch.int32)
    members[0, :3] = torch.tensor([0, 2, 3])
    members[1, :2] = torch.tensor([1, 4])
    seg_tables = torch.zeros(3, max(need), dtype=torch.int32)
    seg_tables[0, :5] = torch.tensor(common[5])
    seg_tables[1, :2] = torch.tensor(common[2])
    paged = PagedDecode(
        tables,
        torch.tensor(lens, dtype=torch.int32),
        bs,
        splits=2,
        starts=torch.tensor([seg.get(b, 0) * bs for b in range(len(lens))], dtype=torch.int32),
        seg_tables=seg_tables,
        seg_lens=torch.tensor([5 * bs, 2 * bs, 0], dtype=torch.int32),
        members=members,
        seg_splits=2,
    )
    got = paged_decode(q, cache[0], cache[1], paged, d**-0.5)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[b, pos // bs].long() * bs + pos % bs
        want, _ = attend(
            q[:, b : b + 1].double(),
            cache[0][:, slots].double(),
            cache[1][:, slots].double(),
            d**-0.5,
        )
        torch.testing.assert_close(got[:, b].double(), want[:, 0], atol=2e-6, rtol=2e-6)
