"""Token choice (server/engine/sampler.py) and SamplingParams validation, on hand-made logits.

Every random draw comes from a fixed seed, so the statistical checks are deterministic: they
cannot flake, and their bounds are far from the values a wrong distribution gives.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.request import InvalidRequest, SamplingParams, Sequence
from server.engine.sampler import filter_logits, finite_rows, make_generator, sample

EOS = 2


def make_seq(params: SamplingParams, output_ids: list[int] | None = None) -> Sequence:
    seq = Sequence("r", "tenant", [5, 6, 7], [], params, arrival=0.0)
    seq.output_ids = list(output_ids or [])
    return seq


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


# filter_logits ----------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert out.tolist() == [-math.inf, -math.inf, -math.inf, 5.0, 4.0]
    assert kept(filter_logits(logits, top_k=1, top_p=1.0)) == [3]
    assert kept(filter_logits(logits, top_k=4, top_p=1.0)) == [1, 2, 3, 4]


@pytest.mark.parametrize("top_k", [0, -1, 5, 6])
def test_top_k_off_or_at_least_vocab_changes_nothing(top_k):
    logits = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    assert filter_logits(logits, top_k=top_k, top_p=1.0).tolist() == logits.tolist()


def test_top_k_keeps_every_token_tied_with_the_kth():
    # As in vLLM: the cut is "below the k-th value", so a tie at the k-th keeps all of it.
    logits = torch.tensor([1.0, 3.0, 3.0, 5.0, 4.0])
    assert kept(filter_logits(logits, top_k=3, top_p=1.0)) == [1, 2, 3, 4]


# Probabilities 1/8, 1/16, 1/2, 1/16, 1/4 (exact in float32, softmax reproduces them bit for
# bit), so the cumulative masses in descending order are exactly 0.5, 0.75, 0.875, 0.9375, 1.
# The one tie (the two 1/16) sits past every boundary tested.
PROBS = [0.125, 0.0625, 0.5, 0.0625, 0.25]
LOG_PROBS = torch.tensor([math.log(p) for p in PROBS])


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.3, [2]),  # the first token always stays, even if its mass alone passes top_p
        (0.5, [2]),  # mass exactly 0.5 reaches top_p: one token is the smallest set
        (0.5001, [2, 4]),
        (0.75, [2, 4]),  # exactly reached by {1/2, 1/4}
        (0.8, [0, 2, 4]),
        (0.875, [0, 2, 4]),  # exactly reached by {1/2, 1/4, 1/8}
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert torch.softmax(LOG_PROBS, -1).tolist() == PROBS
    out = filter_logits(LOG_PROBS, top_k=0, top_p=top_p)
    assert kept(out) == expected
    # Kept tokens keep their logits, at their own positions (the sort is undone).
    assert out[expected].tolist() == LOG_PROBS[expected].tolist()


def test_top_p_applies_after_top_k_on_the_renormalised_mass():
    # After top-k=2 the survivors have masses 2/3 and 1/3, so top_p=0.6 keeps one token;
    # on the unfiltered distribution (0.5, 0.25, ...) top_p=0.6 keeps two.
    assert kept(filter_logits(LOG_PROBS, top_k=0, top_p=0.6)) == [2, 4]
    assert kept(filter_logits(LOG_PROBS, top_k=2, top_p=0.6)) == [2]


# sample: greedy and stop-token bans ------------------------------------------------------


def test_greedy_picks_the_argmax_of_each_row_and_draws_nothing():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [4.0, -1.0, 0.5, 3.9], [0.0, 0.0, 0.1, 7.0]])
    seqs = [make_seq(SamplingParams(temperature=0, seed=5)) for _ in range(3)]
    assert sample(logits.clone(), seqs, eos_ids=()) == [2, 0, 3]
    assert all(s.generator is None for s in seqs)


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached():
    # EOS (2) is the best token, stop token 5 the second, 7 the third.
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.5, 0.0, 8.0, 0.0, 7.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(5,))
    picks = [sample(logits.clone(), [make_seq(params, [1] * n)], (EOS,))[0] for n in range(4)]
    assert picks == [7, 7, EOS, EOS]
    no_eos = SamplingParams(temperature=0, min_tokens=2)
    assert sample(logits.clone(), [make_seq(no_eos)], (EOS,)) == [5]  # only EOS is banned
    # Several EOS ids (tokenizer + generation config) are all banned.
    assert sample(logits.clone(), [make_seq(params)], (EOS, 7)) == [1]


def test_min_tokens_bans_apply_to_sampling_too():
    # EOS and the stop token carry almost all the mass; neither may be drawn before min_tokens.
    logits = torch.tensor([0.0, 0.0, 12.0, 0.0, 0.0, 12.0])
    params = SamplingParams(temperature=1.0, seed=0, min_tokens=5, stop_token_ids=(5,))
    seq = make_seq(params, [1])
    draws = sample(logits.repeat(300, 1), [seq] * 300, (EOS,))
    assert set(draws) == {0, 1, 3, 4}


def test_finite_rows_settles_overflowing_sums_value_by_value():
    """A row is finite exactly when each of its values is: the sum that settles most rows at
    once must not call a row of large finite values (whose sum overflows) non-finite."""
    big = torch.finfo(torch.float32).max
    logits = torch.tensor(
        [
            [0.0, 1.0, -2.0],
            [big, big, 1.0],  # finite values, sum +inf
            [-big, -big, big],  # finite values, sum -inf
            [0.0, float("inf"), 1.0],
            [float("-inf"), 0.0, 0.0],
            [0.0, float("nan"), 0.0],
            [float("inf"), float("-inf"), 0.0],  # sum NaN
        ]
    )
    want = torch.isfinite(logits).all(dim=-1).tolist()
    assert want == [True, True, True, False, False, False, False]
    assert finite_rows(logits) == want
    seqs = [make_seq(SamplingParams(temperature=0)) for _ in range(len(logits))]
    picks = sample(logits, seqs, eos_ids=())
    assert picks[:3] == [1, 0, 2]
    assert all(getattr(p, "kind", None) == "non_finite" for p in picks[3:])


def test_sample_leaves_the_callers_logits_as_they_were():
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.5], [3.0, 0.0, 0.0, 0.0]])
    before = logits.clone()
    params = SamplingParams(temperature=0, min_tokens=1, logit_bias=((3, 100.0),))
    assert sample(logits, [make_seq(params), make_seq(SamplingParams(temperature=0))], (EOS,)) == [
        3,
        0,
    ]
    assert torch.equal(logits, before)


def test_sample_accepts_the_runners_inference_mode_logits():
    """The model runner computes logits under ``torch.inference_mode()``; banning tokens for
    min_tokens must not write into that tensor in place (an inference tensor cannot be
    updated outside inference mode)."""
    with torch.inference_mode():
        logits = torch.tensor([[0.0, 1.0, 9.0, 0.5]])
    seq = make_seq(SamplingParams(temperature=0, min_tokens=1))
    assert sample(logits, [seq], (EOS,)) == [1]


# sample: seeds and distributions ---------------------------------------------------------


def draws(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    """``n`` successive draws of one sequence (one row per draw; the generator advances)."""
    seq = make_seq(params)
    return sample(logits.repeat(n, 1), [seq] * n, eos_ids=())


FLAT = torch.zeros(1, 100)


def test_same_seed_same_samples_different_seed_different_samples():
    a = draws(SamplingParams(seed=1234), FLAT, 50)
    b = draws(SamplingParams(seed=1234), FLAT, 50)
    c = draws(SamplingParams(seed=1235), FLAT, 50)
    assert a == b
    assert a != c
    assert len(set(a)) > 25  # really drawn from the flat distribution
    # Unseeded sequences get independent random generators.
    assert draws(SamplingParams(), FLAT, 50) != draws(SamplingParams(), FLAT, 50)


def test_a_seeded_sequence_draws_the_same_alone_and_in_a_batch():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    alone = make_seq(SamplingParams(seed=7))
    batched = make_seq(SamplingParams(seed=7))
    others = [make_seq(SamplingParams(seed=s)) for s in (1, 2)]
    got_alone, got_batched = [], []
    for _ in range(20):
        got_alone += sample(logits.clone(), [alone], ())
        rows = torch.cat([torch.randn(1, 50), logits, torch.randn(1, 50)])
        got_batched.append(sample(rows, [others[0], batched, others[1]], ())[1])
    assert got_alone == got_batched
    assert make_generator(7).initial_seed() == 7


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


def test_temperature_sampling_follows_softmax_of_logits_over_t():
    logits = torch.tensor([[1.0, 0.0, -1.0, -2.0]])
    t, n = 2.0, 20_000
    picks = draws(SamplingParams(temperature=t, seed=99), logits, n)
    counts = torch.bincount(torch.tensor(picks), minlength=4).tolist()
    want = torch.softmax(logits[0] / t, -1).tolist()
    # 3 degrees of freedom: P(chi2 > 16.3) = 0.001. The untempered distribution, the one a
    # sampler ignoring the temperature would follow, scores in the thousands.
    assert chi_square(counts, want) < 16.3
    assert chi_square(counts, torch.softmax(logits[0], -1).tolist()) > 1000


def test_top_k_and_top_p_sampling_draw_only_from_the_kept_set():
    assert set(draws(SamplingParams(top_k=2, seed=3), LOG_PROBS.unsqueeze(0), 500)) == {2, 4}
    assert set(draws(SamplingParams(top_p=0.8, seed=3), LOG_PROBS.unsqueeze(0), 500)) == {0, 2, 4}
    # Without filtering the tail shows up (1/16 + 1/16 of 500 draws).
    assert set(draws(SamplingParams(seed=3), LOG_PROBS.unsqueeze(0), 500)) == {0, 1, 2, 3, 4}


# SamplingParams validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
    ],
)
def test_bad_sampling_params_name_the_param(kwargs, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_edge_values_are_accepted_and_stop_is_normalised():
    assert SamplingParams(temperature=0).temperature == 0
    assert SamplingParams(temperature=100).temperature == 100
    assert SamplingParams(top_p=1.0, top_k=-1).top_k == -1
    assert SamplingParams(max_tokens=3, min_tokens=3).min_tokens == 3
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[7]).stop_token_ids == (7,)
    assert len(SamplingParams(stop=[str(i) for i in range(16)]).stop) == 16


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_p=5e-324, seed=1),  # rounds to 0 in float32
        SamplingParams(temperature=5e-324, seed=1),  # divides by float32's 0
        SamplingParams(temperature=1e-39, seed=1),  # overflows the best logit to +inf
        SamplingParams(temperature=1e-30, top_p=1e-40, top_k=2, seed=1),
    ],
)
def test_extreme_temperature_and_top_p_pick_the_argmax(params):
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.5], [9.0, 1.0, 0.0, 8.0]])
    assert sample(logits.clone(), [make_seq(params), make_seq(params)], eos_ids=()) == [1, 0]
