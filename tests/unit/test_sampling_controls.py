"""Logit bias, repetition / frequency / presence penalties and logprobs, on hand-made logits:
every expected logit is worked out by hand in the test (values exact in float32)."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.logprobs import token_logprobs
from server.engine.request import InvalidRequest, SamplingParams, Sequence
from server.engine.sampler import adjust_logits, sample

EOS = 99  # outside the 5-token vocabularies used here: never banned, never chosen


def seq_of(params: SamplingParams, prompt: list[int], output: list[int]) -> Sequence:
    seq = Sequence("r", "tenant", list(prompt), [], params, arrival=0.0)
    seq.prompt_token_ids = list(prompt)
    seq.output_ids = list(output)
    return seq


def adjusted(logits: list[float], prompt: list[int], output: list[int], **params) -> list[float]:
    row = torch.tensor(logits)
    adjust_logits(row, seq_of(SamplingParams(**params), prompt, output))
    return row.tolist()


def greedy_pick(logits: list[float], prompt: list[int], output: list[int], **params) -> int:
    seq = seq_of(SamplingParams(temperature=0, **params), prompt, output)
    (token,) = sample(torch.tensor([logits]), [seq], (EOS,))
    return token


def test_logit_bias_adds_to_the_named_tokens():
    logits = [1.0, 2.0, 3.0, 0.5]
    assert adjusted(logits, [4], [], logit_bias={0: 5.0, 3: -0.25}) == [6.0, 2.0, 3.0, 0.25]
    assert greedy_pick(logits, [4], []) == 2
    assert greedy_pick(logits, [4], [], logit_bias={0: 5.0}) == 0  # 6 > 3
    assert greedy_pick(logits, [4], [], logit_bias={2: -100}) == 1  # 3 - 100 < 2


def test_repetition_penalty_divides_positive_and_multiplies_other_logits_of_seen_tokens():
    # Seen: prompt {0, 3} and output {1}. 4 / 2 = 2, -1 * 2 = -2, -2 * 2 = -4; 2 and 4 unseen.
    logits = [4.0, -1.0, 3.0, -2.0, 1.0]
    got = adjusted(logits, [0, 3], [1], repetition_penalty=2.0)
    assert got == [2.0, -2.0, 3.0, -4.0, 1.0]
    assert greedy_pick(logits, [0, 3], [1]) == 0
    assert greedy_pick(logits, [0, 3], [1], repetition_penalty=2.0) == 2
    # Below 1 it rewards repetition: 4 / 0.5 = 8.
    assert adjusted(logits, [0], [], repetition_penalty=0.5)[0] == 8.0


def test_frequency_and_presence_penalties_count_the_output_only():
    # Output [0, 0, 2]: token 0 twice, token 2 once; prompt token 1 is not counted.
    # 0: 3 - 0.5 * 2 - 1 = 1; 2: 2.5 - 0.5 * 1 - 1 = 1; 1: 1.25 untouched.
    logits = [3.0, 1.25, 2.5, 0.0]
    kw = {"frequency_penalty": 0.5, "presence_penalty": 1.0}
    assert adjusted(logits, [1], [0, 0, 2], **kw) == [1.0, 1.25, 1.0, 0.0]
    assert greedy_pick(logits, [1], [0, 0, 2], **kw) == 1
    # Negative values encourage: 0.0 + 2 * 1 + 1 * 1.5 = 3.5 beats 3.
    kw = {"frequency_penalty": -1.0, "presence_penalty": -1.5}
    assert adjusted(logits, [], [3, 3], **kw) == [3.0, 1.25, 2.5, 3.5]
    assert greedy_pick(logits, [], [3, 3], **kw) == 3
    # Nothing generated yet: nothing to penalise.
    assert adjusted(logits, [0], [], frequency_penalty=2.0, presence_penalty=2.0) == logits


def test_the_adjustments_apply_in_order_bias_repetition_then_frequency():
    # Bias first: -1 + 5 = 4, then repetition (positive: / 2) = 2, then presence: 2 - 0.5 = 1.5.
    # (Repetition first would give -1 * 2 + 5 = 3.)
    got = adjusted(
        [-1.0, 0.5], [0], [0], logit_bias={0: 5.0}, repetition_penalty=2.0, presence_penalty=0.5
    )
    assert got == [1.5, 0.5]  # token 1 is neither in the prompt nor in the output


def test_sampling_with_temperature_draws_from_the_adjusted_distribution():
    """At temperature 0.5, the seeded draw equals one made by hand from softmax(adjusted / T)
    with a generator seeded alike."""
    logits = [2.0, 1.0, 0.0, -1.0]
    params = SamplingParams(temperature=0.5, seed=3, logit_bias={3: 4.0}, frequency_penalty=1.0)
    seq = seq_of(params, [], [0])
    hand = torch.tensor([2.0 - 1.0, 1.0, 0.0, -1.0 + 4.0]) / 0.5
    probs = torch.softmax(hand - hand.max(), -1)
    gen = torch.Generator()
    gen.manual_seed(3)
    draws = [int(torch.multinomial(probs, 1, generator=gen)) for _ in range(8)]
    assert [sample(torch.tensor([logits]), [seq], (EOS,))[0] for _ in range(8)] == draws
    # Without the adjustments the same seed draws otherwise (token 0 is then the likely one).
    plain = seq_of(SamplingParams(temperature=0.5, seed=3), [], [0])
    assert [sample(torch.tensor([logits]), [plain], (EOS,))[0] for _ in range(8)] != draws


def test_logprobs_are_log_softmax_of_the_raw_row_with_the_k_best():
    # Probabilities 1/2, 1/4, 1/8, 1/8: exact logs.
    row = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]])) + 7.0  # a shift changes nothing
    (entry,) = token_logprobs(row, [2], 2)
    assert entry.token == 2
    assert entry.logprob == pytest.approx(math.log(0.125), abs=1e-6)
    assert [t for t, _ in entry.top] == [0, 1]
    assert [v for _, v in entry.top] == pytest.approx([math.log(0.5), math.log(0.25)], abs=1e-6)
    (zero,) = token_logprobs(row, [0], 0)
    assert zero.top == () and zero.logprob == pytest.approx(math.log(0.5), abs=1e-6)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # 1 / it overflows
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"logit_bias": {1: 100.5}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(1025)}}, "logit_bias"),
        ({"stop_token_ids": (-3,)}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ],
)
def test_out_of_range_controls_are_refused_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**fields)
    assert info.value.param == param
