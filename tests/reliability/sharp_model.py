"""A tiny model whose output follows its whole context, and HTTP helpers for tests where
tenants and adapters must visibly change outputs (isolation, containment).

The model is the shared tiny model's architecture and tokenizer with untied embeddings and
wider weights: the shared one (tied embeddings, std 0.02) answers by repeating the prompt's
last token whatever precedes it, so a prompt-tuning or text adapter, or another tenant's, would
not change its output; this one's output follows the whole context, so a swapped adapter shows.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from http_helpers import make_llm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from bench.peft_adapters import make_p_tuning, make_prefix_tuning, make_prompt_tuning

MAKERS = {"prefix": make_prefix_tuning, "prompt": make_prompt_tuning, "ptuning": make_p_tuning}
TOKENS = {"prefix": 8, "prompt": 5, "ptuning": 4}  # virtual tokens of each kind made here
MODEL_ID = "tiny-sharp"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-sharp")
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    config.initializer_range = 0.2
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    (out / "prefix_serve_model_id").write_text(MODEL_ID)
    return out


@pytest.fixture(scope="module")
def llm(model_dir: Path):
    return make_llm(model_dir)


@pytest.fixture(scope="module")
def ref(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peft(ref, tmp_path_factory):
    """``peft(kind, seed)``: a PEFT output directory for the model, made once."""
    root = tmp_path_factory.mktemp("isolation-adapters")
    made: dict[tuple[str, int], Path] = {}

    def get(kind: str, seed: int) -> Path:
        if (kind, seed) not in made:
            out = root / f"{kind}-{seed}"
            made[kind, seed] = MAKERS[kind](ref, out, TOKENS[kind], seed=seed)
        return made[kind, seed]

    return get


def client(server, key: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.Client(base_url=server.url, headers=headers, trust_env=False, timeout=60)


def scrape(server) -> dict[str, float]:
    """The /metrics samples, keyed by name with their labels."""
    text = httpx.get(server.url + "/metrics", trust_env=False, timeout=10).text
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines())
        if name and not name.startswith("#")
    }


def generate(http: httpx.Client, body: dict, **headers) -> tuple[str, dict]:
    """(text, usage) of a greedy request for one choice; streamed when ``body["stream"]``."""
    chat = "messages" in body
    route = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"temperature": 0, "ignore_eos": True, "max_tokens": 8, **body}
    if not body.get("stream"):
        r = http.post(route, json=body, headers=headers)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if chat else choice["text"], r.json()["usage"]
    body["stream_options"] = {"include_usage": True}
    parts, usage = [], None
    with http.stream("POST", route, json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    parts.append((c["delta"].get("content") or "") if chat else c["text"])
                usage = chunk["usage"] or usage
    return "".join(parts), usage


def positions(tok, body: dict, text: str = "", virtual: int = 0) -> int:
    """Prompt positions of ``body``: text-adapter tokens, virtual tokens, then the prompt."""
    if "messages" in body:
        ids = tok.apply_chat_template(
            body["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        ids = tok.encode(body["prompt"])
    return len(tok.encode(text, add_special_tokens=False)) + virtual + len(ids)


def run_batch(server, requests: list[tuple[httpx.Client, dict]]) -> tuple[list, int]:
    """Send every request at once while the engine loop is held, so that the engine takes them
    in one go; returns the (text, usage) of each and the most requests seen running."""
    entered, gate = threading.Event(), threading.Event()

    def hold(_llm) -> None:
        entered.set()
        gate.wait(60)

    holder = threading.Thread(target=server.engine.call_blocking, args=(hold, 90))
    holder.start()
    assert entered.wait(30)
    with ThreadPoolExecutor(len(requests)) as pool:
        try:
            futures = [pool.submit(generate, http, body) for http, body in requests]
            deadline = time.monotonic() + 30
            while server.engine.outstanding < len(requests):
                assert time.monotonic() < deadline, server.engine.outstanding
                time.sleep(0.005)
        finally:
            gate.set()
            holder.join()
        peak = 0
        while not all(f.done() for f in futures):
            peak = max(peak, server.engine_state()["running"])
        return [f.result() for f in futures], peak
