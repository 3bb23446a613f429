"""W2 of docs/benchmarks.md: W1's tenants served over real HTTP, driven by the ``openai`` client.

A ``prefix-serve serve`` process (its own process: the client does not share its GIL) gets one
API key per tenant; each tenant uploads its prefix-tuning adapter (32 virtual tokens) through
``POST /v1/adapters`` and sends chat requests (its ~250-token system prompt + a ~40-token
question, N new tokens, EOS ignored, streamed) at a fixed concurrency: 1, 4, 16. Per level:
output tok/s, TTFT and inter-token latency (ITL) p50/p99. Server and in-process engine use
W1's engine configuration (token budget 2048 per step).

The throughput target compares the top level with W1's in-process figure: W1's workload (the
system prompts computed from cold, all requests at once, ``LLM.generate`` in this process).
The machine is shared and noisy, so the two are measured side by side, ``rounds`` times each,
alternating, each run on a W1 workload of its own (fresh system prompts and questions: cold
for both), and their medians compared. A stricter figure is reported too: the same comparison
with every system prompt already cached on both sides (only the questions are new), where the
per-token cost of HTTP weighs most.

TTFT check: at concurrency 1, each question with its (cached) system prompt against the same
question with no system prompt; target p99 ratio <= 1.5.

    prefix-serve bench w2 [--tenants 4] [--requests 4] [--new-tokens 32] [--concurrency 1,4,16]
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from openai import AsyncOpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.peft_adapters import make_prefix_tuning
from bench.w1 import W1_ENGINE
from bench.workloads import VIRTUAL_TOKENS, w1_texts
from server.engine.request import SamplingParams
from server.llm import LLM
from server.model_loader import resolve_model_dir

ADAPTER = "persona"


@dataclass(frozen=True)
class Ask:
    tenant: int
    system: str | None
    question: str


@dataclass
class Sample:
    ttft: float
    itl: list[float]
    tokens: int


@dataclass
class Level:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tok_per_s: float = 0.0
    ttft_p50: float = 0.0
    ttft_p99: float = 0.0
    itl_p50: float = 0.0
    itl_p99: float = 0.0
    ttfts: list[float] = field(default_factory=list, repr=False)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# The client side -----------------------------------------------------------------------------
async def ask(client: AsyncOpenAI, a: Ask, new_tokens: int) -> Sample:
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
        {"role": "user", "content": a.question}
    ]
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=ADAPTER,
        messages=messages,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    stamps, tokens = [], 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Sample(stamps[0] - start, list(np.diff(stamps)), tokens)


async def run_level(
    clients: list[AsyncOpenAI], asks: list[Ask], concurrency: int, new_tokens: int
) -> Level:
    queue: asyncio.Queue[Ask] = asyncio.Queue()
    for a in asks:
        queue.put_nowait(a)
    samples: list[Sample] = []

    async def worker() -> None:
        while not queue.empty():
            a = queue.get_nowait()
            samples.append(await ask(clients[a.tenant], a, new_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    tokens = sum(s.tokens for s in samples)
    ttfts = [s.ttft for s in samples]
    itls = [x for s in samples for x in s.itl]
    return Level(
        concurrency, len(samples), tokens, seconds, tokens / seconds,
        pct(ttfts, 50), pct(ttfts, 99), pct(itls, 50), pct(itls, 99), ttfts,
    )  # fmt: skip


# The server process ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, work: Path, tenants: int, threads: int | None = None
) -> tuple[subprocess.Popen, str]:
    keys = {"keys": [{"key": f"key-{t}", "tenant": f"tenant-{t}"} for t in range(tenants)]}
    (work / "keys.json").write_text(json.dumps(keys))
    port = free_port()
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir),
        "--port", str(port), "--data-dir", str(work / "data"),
        "--api-keys", str(work / "keys.json"), "--device", "cpu", "--dtype", "float32",
        "--max-num-seqs", str(W1_ENGINE.max_num_seqs),
        "--max-num-batched-tokens", str(W1_ENGINE.max_num_batched_tokens),
        "--log-level", "warning",
    ]  # fmt: skip
    log = (work / "server.log").open("w")
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with httpx.Client(trust_env=False) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(work / 'server.log').read_text()}")
            try:
                if http.get(url + "/ready").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)


def upload_adapters(url: str, adapter_dirs: list[Path]) -> None:
    """Each tenant uploads its PEFT adapter as ``persona``, with its own key."""
    with httpx.Client(base_url=url, trust_env=False, timeout=120) as http:
        for t, path in enumerate(adapter_dirs):
            files = {
                "config": ("adapter_config.json", (path / "adapter_config.json").read_bytes()),
                "weights": (
                    "adapter_model.safetensors",
                    (path / "adapter_model.safetensors").read_bytes(),
                ),
            }
            r = http.post(
                "/v1/adapters",
                data={"name": ADAPTER},
                files=files,
                headers={"Authorization": f"Bearer key-{t}"},
            )
            r.raise_for_status()


def clients(url: str, tenants: int) -> list[AsyncOpenAI]:
    return [
        AsyncOpenAI(
            base_url=url + "/v1",
            api_key=f"key-{t}",
            max_retries=0,
            http_client=httpx.AsyncClient(trust_env=False, timeout=600),
        )
        for t in range(tenants)
    ]


# In process, for the side-by-side reference -----------------------------------------------------
def chat_ids(tokenizer, a: Ask) -> list[int]:
    messages = [{"role": "user", "content": a.question}]
    if a.system:
        messages.insert(0, {"role": "system", "content": a.system})
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


class InProcess:
    """The engine in this process (``LLM.generate``), warmed like the server (system prompts
    cached); ``run`` submits its requests all at once."""

    def __init__(
        self, model_dir: Path, adapter_dirs: list[Path], warm: list[Ask], new_tokens: int
    ) -> None:
        self.llm = LLM(str(model_dir), device="cpu", dtype="float32", engine_config=W1_ENGINE)
        for t, path in enumerate(adapter_dirs):
            self.llm.add_adapter(f"tenant-{t}", path)
        self.params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        self.run(warm)

    def run(self, asks: list[Ask]) -> Level:
        prompts = [chat_ids(self.llm.tokenizer, a) for a in asks]
        names = [[f"tenant-{a.tenant}"] for a in asks]
        start = time.perf_counter()
        outs = self.llm.generate(prompts, self.params, names, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outs)
        return Level(len(asks), len(asks), tokens, seconds, tokens / seconds)


# The run ----------------------------------------------------------------------------------------
def questions(
    tokenizer, tenants: int, per_slice: int, slices: int, seed: int = 0
) -> list[list[Ask]]:
    """``slices`` lists of asks (tenant-major), each with its own questions; one system prompt
    per tenant shared by all slices (W1's texts for ``seed``)."""
    texts = w1_texts(tokenizer, tenants, per_slice * slices, seed)
    return [
        [
            Ask(t, system, qs[k * per_slice + i])
            for t, (system, qs) in enumerate(texts)
            for i in range(per_slice)
        ]
        for k in range(slices)
    ]


async def serve_levels(
    url: str, tenants: int, slices: dict, levels: list[int], new_tokens: int,
    reference: InProcess,
) -> tuple[list[Level], dict[str, list[Level]], dict]:  # fmt: skip
    """Each level once (system prompts cached by a warm-up pass); then, alternating with the
    in-process reference, the top level on cold W1 workloads and on warm questions (see the
    module's docstring); then the TTFT check. Returns the level rows, the runs of each side
    by name, and the TTFT figures."""
    cs = clients(url, tenants)
    await run_level(cs, slices["warm"], len(slices["warm"]), new_tokens)  # system prompts
    rows = [
        await run_level(cs, asks, c, new_tokens)
        for c, asks in zip(levels, slices["levels"], strict=True)
    ]
    top = max(levels)
    runs: dict[str, list[Level]] = {"http_cold": [], "local_cold": [], "local_warm": []}
    runs["http_warm"] = [rows[levels.index(top)]]
    for http_asks, local_asks in slices["cold"]:
        runs["http_cold"].append(await run_level(cs, http_asks, top, new_tokens))
        runs["local_cold"].append(reference.run(local_asks))
    for i, local_asks in enumerate(slices["local"]):
        runs["local_warm"].append(reference.run(local_asks))
        if i < len(slices["top"]):
            runs["http_warm"].append(await run_level(cs, slices["top"][i], top, new_tokens))
    bare = [Ask(a.tenant, None, a.question) for a in slices["ttft"]]
    cached = await run_level(cs, slices["ttft"], 1, 2)
    plain = await run_level(cs, bare, 1, 2)
    for c in cs:
        await c.close()
    ttft = {
        "cached_system_p99_s": cached.ttft_p99,
        "no_system_p99_s": plain.ttft_p99,
        "cached_system_p50_s": cached.ttft_p50,
        "no_system_p50_s": plain.ttft_p50,
        "ratio_p99": cached.ttft_p99 / plain.ttft_p99,
    }
    return rows, runs, ttft


def median(levels: list[Level]) -> Level:
    return sorted(levels, key=lambda r: r.tok_per_s)[len(levels) // 2]


def run(
    tenants: int = 4,
    requests: int = 4,
    new_tokens: int = 32,
    levels: list[int] | None = None,
    model: str = "default",
    data_dir: str = "./data",
    json_path: str | None = None,
    plot_path: str | None = None,
    rounds: int = 3,
    threads: int | None = None,
) -> dict:
    """``threads``: torch threads for both the server and the in-process reference (default:
    torch's, one per core)."""
    levels = levels or [1, 4, 16]
    if threads:
        torch.set_num_threads(threads)
    model_dir = resolve_model_dir(model, Path(data_dir))[0]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapter_dirs = [
            make_prefix_tuning(base, work / f"tenant-{t}", VIRTUAL_TOKENS, seed=t)
            for t in range(tenants)
        ]
        del base
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        n = len(levels)
        parts = questions(tokenizer, tenants, requests, 2 + n + 2 * rounds - 1)
        slices = {
            "warm": parts[0],
            "ttft": parts[1],
            "levels": parts[2 : 2 + n],
            "top": parts[2 + n : 1 + n + rounds],  # the first top-level run is a level's
            "local": parts[1 + n + rounds :],
            # Cold W1 workloads, one per run and side: seeds unused by the warm slices.
            "cold": [
                tuple(
                    questions(tokenizer, tenants, requests, 1, seed=1000 + 2 * k + side)[0]
                    for side in range(2)
                )
                for k in range(rounds)
            ],
        }
        reference = InProcess(model_dir, adapter_dirs, slices["warm"], new_tokens)
        proc, url = start_server(model_dir, work, tenants, threads)
        try:
            upload_adapters(url, adapter_dirs)
            rows, runs, ttft = asyncio.run(
                serve_levels(url, tenants, slices, levels, new_tokens, reference)
            )
        finally:
            proc.terminate()
            proc.wait(60)
    ratio = {
        state: median(runs[f"http_{state}"]).tok_per_s / median(runs[f"local_{state}"]).tok_per_s
        for state in ("cold", "warm")
    }
    result = {
        "workload": {
            "name": "W2", "tenants": tenants, "requests_per_tenant": requests,
            "new_tokens": new_tokens, "virtual_tokens": VIRTUAL_TOKENS, "rounds": rounds,
        },
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "levels": [asdict(r) for r in rows],
        "token_budget": W1_ENGINE.max_num_batched_tokens,
        "top_level_runs_tok_per_s": {k: [r.tok_per_s for r in v] for k, v in runs.items()},
        "http_over_w1_in_process": ratio["cold"],
        "http_over_in_process_warm": ratio["warm"],
        "ttft": ttft,
    }  # fmt: skip
    print(format_table(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    if plot_path:
        plot(result, plot_path)
    return result


def format_table(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"W2: {w['tenants']} tenants x {w['requests_per_tenant']} requests per level, "
        f"{w['new_tokens']} new tokens, over HTTP (openai client, streaming)",
        f"{'concurrency':>11}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'ITL p50':>9}{'ITL p99':>9}",
    ]
    for r in result["levels"]:
        lines.append(
            f"{r['concurrency']:>11}{r['tok_per_s']:>9.1f}{r['ttft_p50'] * 1e3:>8.0f}ms"
            f"{r['ttft_p99'] * 1e3:>8.0f}ms{r['itl_p50'] * 1e3:>7.0f}ms{r['itl_p99'] * 1e3:>7.0f}ms"
        )
    runs = result["top_level_runs_tok_per_s"]
    lines.append(
        f"top level vs W1 in process, {len(runs['http_cold'])} cold W1 workloads a side, "
        f"alternating: HTTP {_runs(runs['http_cold'])} tok/s, in-process "
        f"{_runs(runs['local_cold'])} tok/s; medians: HTTP = "
        f"{result['http_over_w1_in_process']:.0%} of W1 in process (target >= 90%)"
    )
    lines.append(
        f"stricter, system prompts already cached on both sides: HTTP {_runs(runs['http_warm'])}"
        f" tok/s, in-process {_runs(runs['local_warm'])} tok/s; medians: HTTP = "
        f"{result['http_over_in_process_warm']:.0%}"
    )
    t = result["ttft"]
    lines.append(
        f"TTFT p99 with a cached system prompt {t['cached_system_p99_s'] * 1e3:.0f} ms vs "
        f"{t['no_system_p99_s'] * 1e3:.0f} ms with none: {t['ratio_p99']:.2f}x (target <= 1.5x)"
    )
    return "\n".join(lines)


def _runs(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["levels"]
    conc = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(conc, [r["tok_per_s"] for r in rows], "o-", label="over HTTP")
    local = float(np.median(result["top_level_runs_tok_per_s"]["local_cold"]))
    axes[0].axhline(local, color="gray", ls="--", label="W1 in process (median)")
    axes[0].set(title="output tokens/s", xlabel="concurrency")
    for ax, key, title in ((axes[1], "ttft", "TTFT (ms)"), (axes[2], "itl", "inter-token (ms)")):
        for q in ("p50", "p99"):
            ax.plot(conc, [r[f"{key}_{q}"] * 1e3 for r in rows], "o-", label=q)
        ax.set(title=title, xlabel="concurrency")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.grid(alpha=0.3)
        ax.legend()
    w = result["workload"]
    fig.suptitle(
        f"W2: {w['tenants']} tenants, prefix tuning ({w['virtual_tokens']} virtual tokens), "
        f"{w['new_tokens']} new tokens, CPU ({result['machine']['cpu_threads']} threads)"
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
