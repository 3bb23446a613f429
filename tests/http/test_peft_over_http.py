"""The correctness contract over HTTP: greedy output through the server, driven by the
``openai`` client, equals the hand reference's (``bench.reference``) for every adapter kind,
each uploaded in a different way (multipart files, .zip, .tar.gz, JSON text), on the real
default model.
Compared up to the first step where the reference's top-2 logits are closer than 1e-3."""

from __future__ import annotations

import pytest
import torch
from http_helpers import files_of, make_llm, peft_entries, tar_gz_of, upload, zip_of
from transformers import AutoModelForCausalLM

from bench.peft_adapters import make_p_tuning, make_prefix_tuning, make_prompt_tuning
from bench.reference import adapter_segment, greedy, text_segment

N_NEW = 12
SYSTEM = "You are a careful assistant for a shipping company. Answer briefly and name the port. "


@pytest.fixture(scope="module")
def real_llm(default_model_dir):
    return make_llm(default_model_dir, kv_cache_memory=256 << 20)


@pytest.fixture(scope="module")
def ref_model(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def real_adapters(ref_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-adapters")
    return {
        "prefix": make_prefix_tuning(ref_model, root / "prefix", num_virtual_tokens=20, seed=1),
        "prefix-proj": make_prefix_tuning(
            ref_model, root / "proj", num_virtual_tokens=12, seed=2, prefix_projection=True
        ),
        "prompt": make_prompt_tuning(ref_model, root / "prompt", num_virtual_tokens=10, seed=3),
        "ptuning": make_p_tuning(ref_model, root / "ptuning", num_virtual_tokens=8, seed=4),
    }


def test_greedy_over_http_equals_the_reference(make_server, real_llm, ref_model, real_adapters):
    server = make_server(real_llm)
    tok = real_llm.tokenizer
    with server.http() as http:
        zipped = zip_of(peft_entries(real_adapters["prefix-proj"]))
        tgz = tar_gz_of(peft_entries(real_adapters["prompt"]))
        uploads = {
            "prefix": files_of(real_adapters["prefix"]),
            "prefix-proj": {"archive": ("a.zip", zipped)},
            "prompt": {"archive": ("a.tgz", tgz)},
            "ptuning": files_of(real_adapters["ptuning"]),
        }
        for name, files in uploads.items():
            assert upload(http, name, **files).status_code == 201
        r = http.post("/v1/adapters", json={"name": "shipping", "text": SYSTEM})
        assert r.status_code == 201
    cases = [
        ("prefix", "The harbour master said"),
        ("prefix-proj", "Write a short poem about the sea:"),
        ("prompt", "My favourite food is"),
        ("ptuning", "In 1850 the city of Hamburg"),
        ("shipping", "Where is parcel 17?"),
        (real_llm.model_id, "The capital of France is"),
    ]
    client = server.openai()
    compared = 0
    for model, prompt in cases:
        ids = tok.encode(prompt)
        if model in real_adapters:
            segments = [adapter_segment(ref_model, real_adapters[model])]
        elif model == "shipping":
            segments = [text_segment(tok.encode(SYSTEM, add_special_tokens=False))]
        else:
            segments = []
        ref = greedy(ref_model, ids, N_NEW, segments)
        want = ref.comparable()
        assert len(want) >= 4, f"{model}: reference tie at step {len(want)}"
        args = dict(model=model, prompt=prompt, max_tokens=len(want), temperature=0)
        args["extra_body"] = {"ignore_eos": True}
        out = client.completions.create(**args)
        assert out.usage.completion_tokens == len(want)
        assert out.choices[0].text == tok.decode(want, skip_special_tokens=True), model
        chunks = client.completions.create(**args, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text, model
        compared += len(want)
    assert compared >= 0.8 * N_NEW * len(cases)


def test_chat_with_adapter_equals_the_reference(make_server, real_llm, ref_model, real_adapters):
    server = make_server(real_llm)
    with server.http() as http:
        assert upload(http, "prefix", **files_of(real_adapters["prefix"])).status_code == 201
    messages = [{"role": "user", "content": "Which port handles grain?"}]
    ids = real_llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    segment = adapter_segment(ref_model, real_adapters["prefix"])
    want = greedy(ref_model, list(ids), N_NEW, [segment]).comparable()
    assert len(want) >= 4
    out = server.openai().chat.completions.create(
        model="prefix",
        messages=messages,
        max_tokens=len(want),
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    expected = real_llm.tokenizer.decode(want, skip_special_tokens=True)
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == 20 + len(ids)  # virtual tokens count as prompt positions
