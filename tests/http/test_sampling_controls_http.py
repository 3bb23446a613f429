"""Sampling controls over HTTP (tiny random model): ``presence_penalty``,
``frequency_penalty``, ``repetition_penalty``, ``logit_bias``, ``stop_token_ids`` and ``seed``
per choice. Greedy tokens are checked step by step against transformers' logits of the same
prefix, adjusted by hand here."""

from __future__ import annotations

import pytest
import torch
from http_helpers import TINY_ID

PROMPT = "The quick brown fox jumps over the lazy dog because"
MARGIN = 1e-3  # below it, summation order may decide the argmax: stop comparing there


@pytest.fixture
def server(make_server, tiny_llm):
    return make_server(tiny_llm)


def hand_adjusted(logits: list[float], prompt: list[int], out: list[int], c: dict) -> list[float]:
    """The documented order, written out: bias, repetition over prompt + output, then
    frequency and presence over the output."""
    row = list(logits)
    for token, bias in c.get("logit_bias", {}).items():
        row[int(token)] += bias
    r = c.get("repetition_penalty", 1.0)
    for t in set(prompt) | set(out):
        row[t] = row[t] / r if row[t] > 0 else row[t] * r
    for t in set(out):
        row[t] -= c.get("frequency_penalty", 0.0) * out.count(t) + c.get("presence_penalty", 0.0)
    return row


def test_penalties_and_bias_give_the_hand_adjusted_greedy_tokens(server, tiny_llm, tiny_ref):
    tok = tiny_llm.tokenizer
    prompt = tok.encode(PROMPT)
    client = server.openai()
    base = dict(model=TINY_ID, prompt=prompt, max_tokens=10, temperature=0)
    plain = client.completions.create(**base, extra_body={"ignore_eos": True})
    plain_ids = tok.encode(plain.choices[0].text, add_special_tokens=False)
    controls = {
        "frequency_penalty": 0.7,
        "presence_penalty": 0.4,
        "logit_bias": {str(plain_ids[1]): -3.0, "1000": 0.5},
        "repetition_penalty": 1.3,
    }
    out = client.completions.create(
        **base,
        frequency_penalty=controls["frequency_penalty"],
        presence_penalty=controls["presence_penalty"],
        logit_bias=controls["logit_bias"],
        logprobs=0,
        extra_body={"ignore_eos": True, "repetition_penalty": controls["repetition_penalty"]},
    )
    ids = [tok.encode(t, add_special_tokens=False) for t in out.choices[0].logprobs.tokens]
    assert all(len(i) == 1 for i in ids)
    got = [i[0] for i in ids]
    assert got != plain_ids[: len(got)]  # the controls changed the choice
    compared = 0
    for j, token in enumerate(got):
        with torch.no_grad():
            logits = tiny_ref(torch.tensor([prompt + got[:j]])).logits[0, -1].tolist()
        row = hand_adjusted(logits, prompt, got[:j], controls)
        best, second = sorted(row, reverse=True)[:2]
        if best - second < MARGIN:
            break
        assert token == row.index(best), j
        compared += 1
    assert compared >= 6


def test_stop_token_ids_end_the_choice(server, tiny_llm):
    client = server.openai()
    tok = tiny_llm.tokenizer
    # Seeded sampling (greedy repeats one token on this model): the same draws until the stop.
    base = dict(model=TINY_ID, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, logprobs=0)
    plain = client.completions.create(**base, extra_body={"ignore_eos": True})
    ids = [tok.encode(t, add_special_tokens=False)[0] for t in plain.choices[0].logprobs.tokens]
    stop_at = max(i for i in range(8) if ids[i] not in ids[:i])  # its first occurrence
    assert stop_at > 0, ids
    out = client.completions.create(
        **base, extra_body={"ignore_eos": True, "stop_token_ids": [ids[stop_at]]}
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == stop_at + 1  # the stop token is the last one
    assert out.choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens[: stop_at + 1]


def test_seed_per_choice_is_seed_plus_index(server):
    client = server.openai()
    args = dict(model=TINY_ID, prompt=PROMPT, max_tokens=6, temperature=1.0)
    args["extra_body"] = {"ignore_eos": True}
    many = client.completions.create(**args, seed=41, n=3)
    singles = [client.completions.create(**args, seed=41 + i).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == singles
    assert len(set(singles)) > 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"49152": 1}}, "logit_bias"),  # the vocabulary's size: no such token
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 0.001}, "repetition_penalty"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"stop_token_ids": [49152]}, "stop_token_ids"),
    ],
)
def test_bad_controls_are_400_naming_the_param(server, fields, param):
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": TINY_ID, "prompt": "x", **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "Value error" not in err["message"], err
    server.wait_idle()
