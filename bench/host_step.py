"""The host's part of GPU decode steps, on any machine: ``prefix-serve bench host``.

On a GPU, decode steps run in windows (``EngineConfig.decode_window``) and the next window
runs on the device while the host settles the last one's tokens: the requests' bookkeeping,
stop checks, detokenization, outputs. That work must stay under the device's time for a
window, or the device waits. This measures it without a GPU: the engine runs as it does on
CUDA, with the default model's tokenizer, except that the device's part of each window is
replaced by ids drawn at random from the tokenizer's ordinary tokens (the prompts still run
through a small random model on the CPU, untimed).

    prefix-serve bench host [--requests 64,256] [--prefix 1024] [--question 128]
                            [--new-tokens 128] [--window 8]

Reports, per number of requests, the median host milliseconds of a decode step (a window's
time shared among its steps) and the microseconds per request and token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.engine.cuda_decode import Window, is_decode_step
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.request import SamplingParams


@dataclass
class _Ready:
    window: Window

    def result(self) -> Window:
        return self.window


class RandomIdsDevice:
    """Stands where ``CudaDecoder`` stands for the engine's windows: every window "computes"
    ids drawn from ``low..high`` at once."""

    def __init__(self, window: int, low: int, high: int, seed: int = 0) -> None:
        self.window = window
        self._rng = np.random.default_rng(seed)
        self._low, self._high = low, high

    def fits(self, plan) -> bool:
        return is_decode_step(plan)

    def can_follow(self, rows: int, tokens: int) -> bool:
        return True

    def run(self, plan) -> tuple[torch.Tensor, torch.Tensor]:
        """A single step (a window of one): logits that make the drawn id the greedy one."""
        n = len(plan.chunks)
        logits = torch.zeros(n, self._high + 200)
        logits[torch.arange(n), torch.from_numpy(self._rng.integers(self._low, self._high, n))] = 1
        return logits, torch.zeros(n, dtype=torch.bool)

    def launch(self, plan, limits, block_tables, keep_tokens: bool = False) -> _Ready:
        shape = (max(limits), len(limits))
        ids = self._rng.integers(self._low, self._high, shape).astype(np.int32)
        return _Ready(Window(ids, np.zeros(shape, dtype=bool)))


def _small_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def measure(
    tokenizer, requests: int, prefix: int, question: int, new_tokens: int, window: int
) -> dict:
    vocab = len(tokenizer)
    low, high = 200, vocab - 200  # ordinary tokens (special ones sit at the ends)
    engine = LLMEngine(
        _small_model(vocab),
        tokenizer,
        EngineConfig(
            max_num_seqs=requests,
            max_num_batched_tokens=1 << 20,
            kv_cache_memory=1 << 30,
            decode_window=window,
        ),
    )
    rng = np.random.default_rng(1)
    system = rng.integers(low, high, prefix).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(requests):
        engine.add_request(f"r{i}", system + rng.integers(low, high, question).tolist(), params)
    while not engine.scheduler.running or engine.scheduler.num_waiting():
        engine.step()  # the prompts, on the CPU
    while any(len(s.output_ids) == 0 for s in engine.scheduler.running):
        engine.step()
    engine.runner.cuda_decoder = RandomIdsDevice(window, low, high)  # type: ignore[assignment]
    per_step: list[float] = []
    done = 0
    while engine.has_unfinished():
        steps = engine.stats.steps
        began = time.perf_counter()
        outs = engine.step()
        took = time.perf_counter() - began
        if engine.stats.steps > steps:
            n = engine.stats.steps - steps
            per_step += [took / n] * n
        done += sum(o.finished for o in outs)
    assert done == requests, f"{done} of {requests} requests finished"
    per_step.sort()
    median = per_step[len(per_step) // 2]
    return {
        "requests": requests,
        "decode_steps": len(per_step),
        "host_ms_per_step": median * 1000,
        "host_us_per_token": median * 1e6 / requests,
    }


def run(
    requests: tuple[int, ...] = (64, 256),
    prefix: int = 1024,
    question: int = 128,
    new_tokens: int = 128,
    window: int = 8,
    model: str = "default",
    data_dir: str = "./data",
    json_path: str | None = None,
) -> dict:
    from transformers import AutoTokenizer

    from server.model_loader import resolve_model_dir

    model_dir = resolve_model_dir(model, Path(data_dir))[0]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    result = {
        "tokenizer": str(model_dir.name),
        "window": window,
        "runs": [measure(tokenizer, n, prefix, question, new_tokens, window) for n in requests],
    }
    for r in result["runs"]:
        print(
            f"{r['requests']:5d} requests: host {r['host_ms_per_step']:.3f} ms a decode step, "
            f"{r['host_us_per_token']:.1f} us a request and token ({r['decode_steps']} steps)"
        )
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
