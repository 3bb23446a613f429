"""Log probabilities over HTTP, driven by the ``openai`` client, on the real default model:
``completions.create(logprobs=5, echo=True)`` and ``chat.completions.create(logprobs=True,
top_logprobs=3)`` give the hand reference's numbers (``bench.reference``: the bare model with
the adapter's virtual tokens in front), streamed or not; an echo request computes its whole
prompt while plain requests beside it keep the prefix cache.

The reference runs in float64: the float32 engine is held within 1e-4 of the exact numbers.
A float32 reference carries float32 error of its own, as large as the engine's: on a 2-core
AVX2-only AMD EPYC, the float32 reference's top-5 prompt log probabilities for the prefix
adapter below were 1.0e-4 from float64's and the engine's 4.9e-5, so against the float32
reference the two differed by 1.5e-4 (on CPUs with AVX-512 both errors were smaller)."""

from __future__ import annotations

import math

import pytest
import torch
from http_helpers import files_of, make_llm, upload
from transformers import AutoModelForCausalLM

from bench.peft_adapters import make_prefix_tuning
from bench.reference import adapter_segment, greedy

TOL = 1e-4
PROMPT = "Once upon a time, a fisherman"


@pytest.fixture(scope="module")
def real_llm(default_model_dir):
    return make_llm(default_model_dir, kv_cache_memory=128 << 20)


@pytest.fixture(scope="module")
def ref_model(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exact_model(default_model_dir):
    """The default model in float64: the reference the log probabilities are checked against."""
    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def prefix_dir(ref_model, tmp_path_factory):
    return make_prefix_tuning(
        ref_model, tmp_path_factory.mktemp("lp") / "prefix", num_virtual_tokens=10, seed=7
    )


def reference_logprobs(model, ids, segments, n_new):
    """Teacher-forced log-softmax rows of the hand reference: row j scores ``ids[j + 1]``
    (each row from its own run over the prefix ``ids[: j + 1]``), then the greedy steps."""
    rows = []
    for j in range(1, len(ids)):
        step = greedy(model, ids[:j], 1, segments, keep_logits=True)
        rows.append(torch.log_softmax(step.logits[0], -1))
    gen = greedy(model, ids, n_new, segments, keep_logits=True)
    rows += [torch.log_softmax(r, -1) for r in gen.logits]
    return rows, gen


def check_top(top: dict, row: torch.Tensor, k: int, texts) -> None:
    """``top`` (token text -> logprob) holds the reference's k best with their values."""
    values, ids = row.topk(k)
    for tid, value in zip(ids.tolist(), values.tolist(), strict=True):
        assert abs(top[texts(tid)] - value) < TOL, (texts(tid), top)


@pytest.mark.parametrize("adapter", [None, "prefix"])
def test_completion_logprobs_with_echo_equal_the_reference(
    make_server, real_llm, exact_model, prefix_dir, adapter
):
    server = make_server(real_llm)
    tok = real_llm.tokenizer
    segments = []
    if adapter:
        with server.http() as http:
            assert upload(http, adapter, **files_of(prefix_dir)).status_code == 201
        segments = [adapter_segment(exact_model, prefix_dir)]
    model = adapter or real_llm.model_id
    ids = tok.encode(PROMPT)
    rows, gen = reference_logprobs(exact_model, ids, segments, 3)
    want = gen.comparable()
    assert len(want) == 3, "reference tie"
    client = server.openai()
    out = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=3,
        temperature=0,
        logprobs=5,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    lp = choice.logprobs
    texts = lambda t: tok.decode([t])  # noqa: E731
    tokens = ids + want
    assert choice.text == PROMPT + tok.decode(want)
    assert lp.tokens == [texts(t) for t in tokens]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(tokens)):
        expected = rows[j - 1][tokens[j]].item()
        assert abs(lp.token_logprobs[j] - expected) < TOL, (j, lp.token_logprobs[j], expected)
        check_top(lp.top_logprobs[j], rows[j - 1], 5, texts)
        assert len(lp.top_logprobs[j]) in (5, 6)  # the 5 best, and the chosen token
    offsets = [sum(len(texts(t)) for t in tokens[:j]) for j in range(len(ids))]
    offsets += [len(PROMPT) + sum(len(texts(t)) for t in want[:j]) for j in range(len(want))]
    assert lp.text_offset == offsets
    # The virtual tokens count as prompt positions; an echo request takes nothing cached.
    assert out.usage.prompt_tokens == len(ids) + (10 if adapter else 0)
    assert out.usage.prompt_tokens_details.cached_tokens == 0

    # Streamed: the prompt first (its logprobs with it), then each token's with its text.
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            logprobs=5,
            echo=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.choices[0].logprobs is not None:
            for key in merged:
                merged[key] += getattr(c.choices[0].logprobs, key)
    assert merged == lp.model_dump()


def test_max_tokens_zero_with_echo_scores_the_prompts_alone(make_server, real_llm, exact_model):
    """OpenAI's legacy scoring call (``echo: true, max_tokens: 0``): each choice is its prompt
    with the prompt's log probabilities (the float64 reference's, within TOL) and nothing
    generated, finished for length, no completion tokens counted; streamed, the same text and
    log probabilities. Without echo, or with min_tokens, max_tokens 0 is refused."""
    server = make_server(real_llm)
    tok = real_llm.tokenizer
    prompts = [PROMPT, "The capital of France is"]
    texts = lambda t: tok.decode([t])  # noqa: E731
    client = server.openai()
    args = dict(model=real_llm.model_id, prompt=prompts, max_tokens=0, logprobs=2, echo=True)
    out = client.completions.create(**args)
    assert [c.index for c in out.choices] == [0, 1]
    for choice, prompt in zip(out.choices, prompts, strict=True):
        ids = tok.encode(prompt)
        assert choice.text == prompt and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens == [texts(t) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for j in range(1, len(ids)):
            row = torch.log_softmax(greedy(exact_model, ids[:j], 1, keep_logits=True).logits[0], -1)
            assert abs(lp.token_logprobs[j] - row[ids[j]].item()) < TOL, j
            check_top(lp.top_logprobs[j], row, 2, texts)
    assert out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert out.usage.total_tokens == out.usage.prompt_tokens

    chunks = list(client.completions.create(**args, stream=True))
    for i, choice in enumerate(out.choices):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine][-1] == "length"
        merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in mine:
            if c.logprobs is not None:
                for key in merged:
                    merged[key] += getattr(c.logprobs, key)
        assert merged == choice.logprobs.model_dump()

    with server.http() as http:
        for extra in ({"echo": False}, {"min_tokens": 1}):
            body = {"model": real_llm.model_id, "prompt": PROMPT, "max_tokens": 0, **extra}
            if "echo" not in extra:
                body["echo"] = True
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "max_tokens"


def test_completion_logprobs_without_echo_and_zero_top(make_server, real_llm, exact_model):
    server = make_server(real_llm)
    tok = real_llm.tokenizer
    ids = tok.encode(PROMPT)
    gen = greedy(exact_model, ids, 4, keep_logits=True)
    want = gen.comparable()
    out = server.openai().completions.create(
        model=real_llm.model_id,
        prompt=ids,
        max_tokens=len(want),
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in want]
    for j, t in enumerate(want):
        expected = torch.log_softmax(gen.logits[j], -1)[t].item()
        assert abs(lp.token_logprobs[j] - expected) < TOL
        assert lp.top_logprobs[j] == {lp.tokens[j]: lp.token_logprobs[j]}  # k=0: the chosen
    assert lp.text_offset == [sum(len(w) for w in lp.tokens[:j]) for j in range(len(want))]


def test_logprobs_are_of_the_raw_distribution(make_server, real_llm):
    """Sampling at temperature 1.7 with a logit bias still reports the model's own logprobs:
    the same number as greedy decoding gives for the same token at the same step."""
    server = make_server(real_llm)
    client = server.openai()
    base = (
        client.completions.create(
            model=real_llm.model_id, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=3
        )
        .choices[0]
        .logprobs
    )
    first = base.tokens[0]
    tid = real_llm.tokenizer.encode(first, add_special_tokens=False)
    assert len(tid) == 1
    out = (
        client.completions.create(
            model=real_llm.model_id,
            prompt=PROMPT,
            max_tokens=1,
            temperature=1.7,
            logprobs=3,
            logit_bias={str(tid[0]): 100},
            seed=5,
        )
        .choices[0]
        .logprobs
    )
    assert out.tokens == [first]  # +100 makes it certain
    assert abs(out.token_logprobs[0] - base.token_logprobs[0]) < 1e-6
    assert out.top_logprobs == base.top_logprobs


def test_chat_logprobs_equal_the_reference(make_server, real_llm, exact_model, prefix_dir):
    server = make_server(real_llm)
    tok = real_llm.tokenizer
    with server.http() as http:
        assert upload(http, "prefix", **files_of(prefix_dir)).status_code == 201
    messages = [{"role": "user", "content": "Which port handles grain?"}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    gen = greedy(
        exact_model, list(ids), 4, [adapter_segment(exact_model, prefix_dir)], keep_logits=True
    )
    want = gen.comparable()
    assert len(want) >= 3
    args = dict(
        model="prefix",
        messages=messages,
        max_tokens=len(want),
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    client = server.openai()

    def check(content) -> None:
        assert [c.token for c in content] == [tok.decode([t]) for t in want]
        for j, (entry, t) in enumerate(zip(content, want, strict=True)):
            row = torch.log_softmax(gen.logits[j], -1)
            assert abs(entry.logprob - row[t].item()) < TOL
            assert entry.bytes == list(entry.token.encode())
            values, best = row.topk(3)
            assert [x.token for x in entry.top_logprobs] == [tok.decode([b]) for b in best.tolist()]
            for x, v in zip(entry.top_logprobs, values.tolist(), strict=True):
                assert abs(x.logprob - v) < TOL

    check(client.chat.completions.create(**args).choices[0].logprobs.content)
    # Streamed. This request finds the first one's prompt blocks in the
    # prefix cache, so its numbers are computed in another split (cached prefix, merged
    # attention) and may differ from the first's in the last float32 bits: both are held to
    # the reference.
    streamed = [
        e
        for c in client.chat.completions.create(**args, stream=True)
        if c.choices and c.choices[0].logprobs is not None
        for e in c.choices[0].logprobs.content
    ]
    check(streamed)
    # Without logprobs: null, as before.
    plain = client.chat.completions.create(model="prefix", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_echo_requests_recompute_and_plain_requests_keep_the_cache(make_server, real_llm):
    """A 40-token prompt: the echo request computes all of it (cached_tokens 0) and caches
    its blocks; a plain request with the same prompt then finds two of its blocks cached; a
    second echo request computes it again and gets exactly the same numbers."""
    server = make_server(real_llm)
    client = server.openai()
    prompt = " ".join(["The ships came into the harbour one after another"] * 4)
    ids = real_llm.tokenizer.encode(prompt)
    assert 32 < len(ids) < 48
    args = dict(model=real_llm.model_id, prompt=prompt, max_tokens=2, temperature=0)
    first = client.completions.create(**args, logprobs=2, echo=True)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    plain = client.completions.create(**args)
    assert plain.usage.prompt_tokens_details.cached_tokens == 32
    assert plain.choices[0].text == first.choices[0].text[len(prompt) :]
    again = client.completions.create(**args, logprobs=2, echo=True)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].logprobs == first.choices[0].logprobs
    assert all(math.isfinite(x) for x in first.choices[0].logprobs.token_logprobs[1:])
    server.wait_idle()


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ],
)
def test_bad_logprobs_fields_are_400_naming_the_param(make_server, tiny_llm, route, body, param):
    server = make_server(tiny_llm)
    if route.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "x"}], **body}
    with server.http() as http:
        r = http.post(route, json={"model": tiny_llm.model_id, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "Value error" not in err["message"], err
