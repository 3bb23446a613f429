"""The decode kernel compiled for the GPU (the CPU suite runs it under Triton's interpreter):
float32 and bfloat16 against the reference attention in float64."""

from __future__ import annotations

import pytest
import torch

from server.engine.triton_attention import paged_decode
from tests.unit.test_triton_attention import CASES, _case

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lens", "hq", "hkv", "d", "block_size", "splits", "shared"), CASES)
def test_paged_decode_on_cuda(dtype, lens, hq, hkv, d, block_size, splits, shared):
    q, cache, paged, want = _case(lens, hq, hkv, d, block_size, splits, shared=shared)
    q = q.to("cuda", dtype)
    cache = cache.to("cuda", dtype)
    paged.tables, paged.lens = paged.tables.cuda(), paged.lens.cuda()
    if dtype == torch.bfloat16:  # the reference over the same rounded inputs
        _, _, _, want = _case(lens, hq, hkv, d, block_size, splits, shared=shared, round_bf16=True)
    got = paged_decode(q, cache[0], cache[1], paged, d**-0.5).double().cpu()
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
