"""The decode step's fused layer kernels (``engine/triton_layers.py``), under Triton's
interpreter on the CPU, against the operators they replace (``engine/decoder.py``'s, which
are transformers')."""

from __future__ import annotations

import pytest
import torch

from server.engine.decoder import _rms_norm, _rotate
from server.engine.triton_layers import add_rms_norm, greedy_advance, rope_write, silu_mul

pytestmark = pytest.mark.triton_interpreter


class _Norm:
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.variance_epsilon = weight, eps


def test_add_rms_norm_is_the_residual_sum_then_rmsnorm():
    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(5, 96, generator=gen), torch.randn(5, 96, generator=gen)
    weight = torch.randn(96, generator=gen)
    out, new_res = add_rms_norm(x, res, weight, 1e-5)
    assert torch.equal(new_res, x + res)
    torch.testing.assert_close(out, _rms_norm(x + res, _Norm(weight, 1e-5)), atol=1e-6, rtol=1e-6)
    out, same = add_rms_norm(x, None, weight, 1e-6)
    assert same is x
    torch.testing.assert_close(out, _rms_norm(x, _Norm(weight, 1e-6)), atol=1e-6, rtol=1e-6)


def test_rope_write_rotates_writes_and_zeroes_a_row_that_is_not_finite():
    gen = torch.Generator().manual_seed(1)
    rows, hq, hkv, d = 4, 6, 2, 24  # a half-head of 12: padded to 16 inside
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=gen)
    qkv[2, (hq + hkv) * d + 5] = float("inf")  # row 2: one value is infinite
    angle = torch.rand(rows, d // 2, generator=gen) * 6
    cos, sin = torch.cat([angle.cos()] * 2, dim=1), torch.cat([angle.sin()] * 2, dim=1)
    cache = torch.zeros(2, hkv, 32, d)
    slots = torch.tensor([7, 0, 31, 12], dtype=torch.int32)
    flags = torch.zeros(rows, dtype=torch.bool)
    q = rope_write(qkv, cos, sin, cache[0], cache[1], slots, flags, hq, hkv)
    signed = torch.cat((-sin[:, : d // 2], sin[:, d // 2 :]), dim=1)[:, None, :]
    parts = qkv.view(rows, hq + 2 * hkv, d)
    want_q = _rotate(parts[:, :hq], cos[:, None, :], signed)
    want_k = _rotate(parts[:, hq : hq + hkv], cos[:, None, :], signed)
    torch.testing.assert_close(q, want_q, atol=1e-6, rtol=1e-6)
    assert flags.tolist() == [False, False, True, False]
    for row, slot in enumerate(slots.tolist()):
        k, v = cache[0][:, slot], cache[1][:, slot]
        if row == 2:
            assert not k.any() and not v.any()
        else:
            torch.testing.assert_close(k, want_k[row], atol=1e-6, rtol=1e-6)
            assert torch.equal(v, parts[row, hq + hkv :])
    untouched = [s for s in range(32) if s not in slots.tolist()]
    assert not cache[:, :, untouched].any()


def test_silu_mul_is_silu_of_the_gate_times_up():
    gen = torch.Generator().manual_seed(2)
    gate_up = torch.randn(3, 2 * 1500, generator=gen)  # two column blocks, the second partial
    want = torch.nn.functional.silu(gate_up[:, :1500]) * gate_up[:, 1500:]
    torch.testing.assert_close(silu_mul(gate_up), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_advance_picks_torchs_argmax_and_moves_each_row_on(dtype):
    """Five rows over a vocabulary of 5,000 (three blocks of 2,048, the last partial): a tie
    between two blocks and one inside a block (the first index wins, as torch.argmax), a NaN
    and an infinity (-1), a row past its limit (scratch slot, no move); written to row
    ``step`` of a window of 3, then the step moves on (and stops at the window's end)."""
    gen = torch.Generator().manual_seed(4)
    rows, vocab, bs = 5, 5000, 4
    logits = torch.randn(rows, vocab, generator=gen).to(dtype)
    logits[0, 4500] = logits[0, 300] = 9.0  # the first (300) wins, across blocks
    logits[1, 70] = logits[1, 71] = 8.0  # within a block: 70
    logits[2, 4999] = float("nan")
    logits[3, 10] = float("-inf")
    nonfinite = torch.tensor([False, True, False, False, False])
    window = 3
    ids = torch.full((window, 8), 77, dtype=torch.int32)  # wider than the rows, as per bucket
    flags = torch.zeros(window, 8, dtype=torch.bool)
    step = torch.tensor([1], dtype=torch.int32)
    tokens = torch.zeros(rows, dtype=torch.int32)
    positions = torch.tensor([5, 7, 3, 0, 11], dtype=torch.int32)
    lens = positions + 1
    limits = torch.tensor([3, 3, 3, 3, 2], dtype=torch.int32)  # row 4: step 2 is past it
    tables = torch.tensor([[9, 4, 6, 0], [1, 2, 3, 8], [5, 0, 0, 0], [7, 0, 0, 0], [2, 3, 4, 0]])
    tables = tables.to(torch.int32)
    slots = torch.zeros(rows, dtype=torch.int32)
    buffers = (step, tokens, positions, slots, lens, limits, tables)

    def advance() -> None:
        greedy_advance(logits, nonfinite, ids[:, :rows], flags[:, :rows], *buffers, bs, 40)

    advance()
    want = logits.float().argmax(dim=-1).tolist()
    assert want[:2] == [300, 70]
    assert ids[1, :rows].tolist() == [300, 70, -1, -1, want[4]]
    assert ids[0].tolist() == [77] * 8 and ids[1, rows:].tolist() == [77] * 3
    assert flags[1, :rows].tolist() == [False, True, False, False, False]
    assert tokens.tolist() == [300, 70, 0, 0, want[4]]
    # Rows 0-3 move to positions 6, 8, 4, 1: slot = table[pos // 4] * 4 + pos % 4.
    assert positions.tolist() == [6, 8, 4, 1, 11]
    assert slots.tolist() == [4 * 4 + 2, 3 * 4 + 0, 0 * 4 + 0, 7 * 4 + 1, 40]
    assert lens.tolist() == [7, 9, 5, 2, 12]
    assert step.tolist() == [2]
    for _ in range(3):  # past the window: the last row is rewritten, the step stays at 3
        advance()
    assert step.tolist() == [3] and ids[2, :rows].tolist() == [300, 70, -1, -1, want[4]]
