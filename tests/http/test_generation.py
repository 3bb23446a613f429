"""/v1/completions, /v1/chat/completions and /v1/models over real HTTP (tiny random model):
response shapes, streaming, n, stop, seed, usage and cached tokens, token limits."""

from __future__ import annotations

import json
import random
import statistics
import time
from types import SimpleNamespace

import pytest
from http_helpers import TINY_ID, make_llm

from server.api.generation import _apply_template, _encode
from server.api.jobs import TextDeltas
from server.api.prompt_limits import longest_token_bytes
from server.engine.request import RequestOutput

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture
def server(make_server, tiny_llm):
    return make_server(tiny_llm)


def sse_events(response) -> list:
    """Parse an SSE body into JSON chunks (and the final "[DONE]")."""
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models_lists_the_base_model(server):
    models = server.openai().models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [
        (TINY_ID, "model", "prefix-serve")
    ]
    assert models.data[0].model_extra["parent"] is None


def test_completion_shape_and_usage(server, tiny_llm):
    out = server.openai().completions.create(
        model=TINY_ID, prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.model == TINY_ID
    assert [(c.index, c.finish_reason) for c in out.choices] == [(0, "length")]
    n_prompt = len(tiny_llm.tokenizer.encode(PROMPT))
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == n_prompt + 7
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    # Greedy is deterministic, and a token-id prompt gives the same answer.
    ids = tiny_llm.tokenizer.encode(PROMPT)
    again = server.openai().completions.create(
        model=TINY_ID, prompt=ids, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].text == out.choices[0].text
    # The whole prompt but its last block is now served from the prefix cache.
    assert again.usage.prompt_tokens_details.cached_tokens == (n_prompt - 1) // 16 * 16


def test_streaming_completion_equals_non_streaming(server):
    client = server.openai()
    args = dict(model=TINY_ID, prompt=PROMPT + " it", max_tokens=12, temperature=0)
    args["extra_body"] = {"ignore_eos": True}
    whole = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(server):
    body = {"model": TINY_ID, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    body["temperature"] = 0
    with server.http() as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])  # no include_usage: no usage key
    assert r.text.endswith("data: [DONE]\n\n")


def test_chat_streaming_and_usage(server, tiny_llm):
    client = server.openai()
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]
    args = dict(model=TINY_ID, messages=messages, max_completion_tokens=9, temperature=0)
    args["extra_body"] = {"ignore_eos": True}
    whole = client.chat.completions.create(**args)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    flat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    ids = tiny_llm.tokenizer.apply_chat_template(
        flat, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 9
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


def test_n_seed_and_sampling(server):
    client = server.openai()
    args = dict(model=TINY_ID, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=1234, n=3)
    args["extra_body"] = {"ignore_eos": True}
    a = client.completions.create(**args)
    b = client.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert len({c.text for c in a.choices}) > 1  # each choice has its own stream
    assert a.usage.completion_tokens == 18
    # top_k=1 samples the argmax: the same as greedy.
    greedy = client.completions.create(
        model=TINY_ID, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    top1 = client.completions.create(
        model=TINY_ID,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0.8,
        extra_body={"ignore_eos": True, "top_k": 1},
    )
    assert top1.choices[0].text == greedy.choices[0].text


def test_several_prompts_times_n(server):
    out = server.openai().completions.create(
        model=TINY_ID, prompt=["one two", "three four five"], n=2, max_tokens=2, temperature=0
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both choices of prompt 0
    assert out.usage.prompt_tokens == 2 + 3  # each prompt counted once


def test_stop_strings_cut_the_text(server):
    client = server.openai()
    base = dict(model=TINY_ID, prompt="Stop test:", max_tokens=24, temperature=0)
    base["extra_body"] = {"ignore_eos": True}
    full = client.completions.create(**base).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), full
    expected = full[: full.index(stop)]
    cut = client.completions.create(**base, stop=[stop, "never-seen-xyz"])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**base, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_min_tokens(server):
    out = server.openai().completions.create(
        model=TINY_ID, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"min_tokens": 5}
    )
    assert out.usage.completion_tokens == 5


def test_chat_without_max_tokens_fills_the_context(make_server, tiny_model_dir):
    llm = make_llm(tiny_model_dir, kv_cache_memory=16 * 512 * 16)  # 16 blocks: 256 positions
    assert llm.served.facts.max_model_len == llm.engine.max_model_len == 256
    out = (
        make_server(llm)
        .openai()
        .chat.completions.create(
            model=TINY_ID,
            messages=[{"role": "user", "content": "hi"}],
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 256


# TextDeltas (server/api/jobs.py): what a stream sends of a growing text. -------------------------
class _HoldBackReference:
    """The plain rule TextDeltas implements: while unfinished, hold back trailing U+FFFD and
    the longest suffix that is a prefix of a stop string (whole stop strings included)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.sent = stops, 0

    def update(self, text: str, finished: bool) -> str:
        end = len(text)
        if not finished:
            while end and text[end - 1] == "\ufffd":
                end -= 1
            held = [
                k for s in self.stops for k in range(1, len(s) + 1) if text[:end].endswith(s[:k])
            ]
            end -= max(held, default=0)
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta


def _output(text: str, finished: bool = False) -> RequestOutput:
    reason = "stop" if finished else None
    return RequestOutput("r", [], [], text, finished, reason, 0, 0)


def test_text_deltas_hold_back_exactly_as_the_rule_says():
    """Random texts over a small alphabet (so that stop prefixes keep appearing), grown a few
    characters a step, a trailing U+FFFD sometimes completed into another character (what the
    detokenizer does) and sometimes a rewrite of text not sent yet."""
    rng = random.Random(7)
    steps = 0
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(3)]
        stops = stops[: rng.randint(0, 3)]
        deltas, reference = TextDeltas(stops), _HoldBackReference(stops)
        text, sent = "", ""
        for _ in range(rng.randint(1, 15)):
            if text.endswith("\ufffd") and rng.random() < 0.5:
                text = text.rstrip("\ufffd")  # the incomplete character completes...
            if rng.random() < 0.1:  # ...or a rewrite of what was not sent
                text = sent + "".join(rng.choice("ab") for _ in range(len(text) - len(sent)))
            text += "".join(rng.choice("ab\ufffd") for _ in range(rng.randint(0, 4)))
            got = deltas.update(_output(text))
            assert got == reference.update(text, False), (stops, text, sent)
            sent += got
            steps += 1
        final = text.rstrip("\ufffd") + "a"
        assert deltas.update(_output(final, True)) == reference.update(final, True)
    assert steps > 20_000


def test_text_deltas_work_per_step_does_not_grow_with_the_output():
    """A 60,000-character output, 4 characters a step, against a 20,000-character stop string
    that never matches: the held-back check used to slice and compare every prefix of the stop
    string at every step (0.1 s a step once the text is as long) and to copy the text sent."""
    stop = "b" * 20_000
    deltas = TextDeltas([stop, "zz"])
    text, spent, sent = "", [], 0
    for _ in range(15_000):
        text += "wxyz"
        out = _output(text)
        start = time.perf_counter()
        sent += len(deltas.update(out))
        spent.append(time.perf_counter() - start)
        assert sum(spent) < 10, f"quadratic: {len(text)} characters, {sum(spent):.1f} s"
    assert sent == len(text) - 1  # the last "z" could start "zz"
    # Steps with the text past the stop string's length (the check's window is full) against
    # the last ones, three times as long: the same cost (medians: the machine is shared).
    window, last = statistics.median(spent[5_000:6_000]), statistics.median(spent[-1_000:])
    assert last < 2 * window + 20e-6, (window, last)


# Prompt limits (server/api/generation.py): the byte cap's token size. ---------------------------
def test_longest_token_bytes_only_where_no_input_is_dropped_or_shrunk(tiny_llm):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = tiny_llm.tokenizer
    ids = range(len(tokenizer))
    longest = max(len(tokenizer.decode([i], skip_special_tokens=False).encode()) for i in ids)
    assert longest == 81  # a run of spaces, in this byte-level BPE vocabulary
    assert longest_token_bytes(tokenizer) == longest

    def variant(**parts) -> SimpleNamespace:
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        for name, value in parts.items():
            setattr(backend, name, value)
        return SimpleNamespace(backend_tokenizer=backend)

    lengthening = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    assert longest_token_bytes(variant(normalizer=lengthening)) == longest
    assert longest_token_bytes(variant(normalizer=normalizers.NFC())) == 3 * longest
    assert longest_token_bytes(variant(normalizer=normalizers.Lowercase())) is None
    assert longest_token_bytes(variant(normalizer=normalizers.Replace("ab", "c"))) is None
    dropping = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(), pre_tokenizers.Whitespace()])
    assert longest_token_bytes(variant(pre_tokenizer=dropping)) is None
    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    assert longest_token_bytes(SimpleNamespace(backend_tokenizer=words)) is None  # whole words
    vocab = {"a": 0, "b": 1, "[UNK]": 2}
    # Fused, any run of unknown characters is one token; else "[UNK]", measured as the second
    # of two copies, which a tokenizer without a decoder joins with a space: 6 bytes.
    for fuse, expected in ((True, None), (False, 6)):
        bpe = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]", fuse_unk=fuse))
        assert longest_token_bytes(SimpleNamespace(backend_tokenizer=bpe)) == expected
    assert longest_token_bytes(object()) is None  # not a `tokenizers` tokenizer


def test_prompt_work_in_the_pool_returns_plain_lists(tiny_llm):
    """What runs in the worker pool builds no tensor (no torch in those threads)."""
    ids = _encode(tiny_llm.tokenizer, ["Hello there", "x"])
    chat = _apply_template(tiny_llm.tokenizer, [{"role": "user", "content": "Hello"}])
    assert ids == [tiny_llm.tokenizer.encode(t) for t in ("Hello there", "x")]
    for got in (*ids, chat):
        assert type(got) is list and {type(t) for t in got} == {int}
