"""Peers on W1's text-only equivalent: what a user could run instead of prefix-serve when no
adapter is involved (the same chat prompts, greedy, EOS ignored, all submitted at once).

- transformers' own continuous batching (``model.generate_batch``, paged KV, sdpa attention),
  on a fresh float32 copy of the model (it switches the model's attention implementation);
- llama.cpp's ``llama-server`` with one slot per request, when the binary is on the PATH and
  a GGUF file is given, driven over its HTTP API with its default settings. Never a test
  dependency: without it the benchmark says so and goes on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bench.local_process import free_port
from bench.workloads import Workload


@dataclass(frozen=True)
class PeerResult:
    name: str
    tokens: list[list[int]]  # in the workload's request order (empty lists when not known)
    generated: int
    seconds: float
    dtype: str = "float32"


def transformers_batch(base_model, workload: Workload) -> PeerResult:
    """``generate_batch`` over every request's prompt at once, after an untimed warm-up."""
    model = AutoModelForCausalLM.from_pretrained(
        base_model.config._name_or_path or base_model.name_or_path, dtype=torch.float32
    ).eval()
    config = GenerationConfig(
        max_new_tokens=workload.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    prompts = [r.prompt_ids for r in workload.requests]
    # No inference_mode here: generate_batch runs its own thread, outside any such context.
    model.generate_batch(inputs=prompts[:1], generation_config=config, progress_bar=False)
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    seconds = time.perf_counter() - start
    # Request ids are assigned in submission order: req_0, req_1, ...
    ordered = sorted(out.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))
    tokens = [list(o.generated_tokens) for o in ordered]
    return PeerResult("transformers generate_batch", tokens, sum(map(len, tokens)), seconds)


def llama_server(workload: Workload, gguf: str | None) -> PeerResult | str:
    """The peer result, or a line saying why it was skipped."""
    binary = shutil.which("llama-server")
    if binary is None:
        return "llama.cpp: llama-server is not on the PATH; skipped (optional peer)"
    if gguf is None or not Path(gguf).is_file():
        return "llama.cpp: no GGUF file given (--llama-gguf); skipped"
    n = len(workload.requests)
    port = free_port()
    cmd = [binary, "-m", gguf, "--port", str(port), "-np", str(n), "-c", str(n * 1024)]
    cmd += ["-t", str(torch.get_num_threads()), "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port)
        ask = _completion(port, workload.new_tokens)
        ask(workload.requests[0].prompt_ids)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            tokens = list(pool.map(ask, [r.prompt_ids for r in workload.requests]))
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)
    name = f"llama-server ({Path(gguf).name})"
    return PeerResult(name, tokens, sum(map(len, tokens)), seconds, "gguf")


def _completion(port: int, new_tokens: int):
    def ask(prompt_ids: list[int]) -> list[int]:
        body = {
            "prompt": prompt_ids,
            "n_predict": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_tokens": True,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/completion",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return list(json.loads(response.read()).get("tokens", []))

    return ask


def _wait_ready(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"llama-server did not get ready on port {port}")
