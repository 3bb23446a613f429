"""lm-evaluation-harness as a real client: its ``local-completions`` model, run by its own
command line (the recipe of docs/evaluation.md), against a live server on the real default
model, on the two small tasks of ``tasks/`` (local JSON Lines files, no hub): a multiple-choice
task (``loglikelihood``: ``/v1/completions`` with ``echo`` and ``logprobs``) and a generation
task (``generate_until``: ``max_tokens`` and ``stop``), for the base model and for an uploaded
prefix-tuning adapter.

Every log-likelihood lm_eval reports equals the hand reference's (``bench.reference``: the
bare model with the adapter's prefix KV, one teacher-forced token at a time) within 1e-4, and
every generation equals the reference's greedy tokens. The figures (accuracies and
log-likelihoods, base vs adapter) are printed; docs/evaluation.md quotes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from http_helpers import KEYS, files_of, make_llm, upload
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bench.reference import adapter_segment, greedy, prefix_kv

TASKS = Path(__file__).parent / "tasks"
TOL = 1e-4
ADAPTER = "facts-prefix"
# The adapter's meaning: prefix KV of this text (a trained adapter would hold learned KV).
INSTRUCTION = "Answer every question with a single word, and nothing else.\n\n"
TASK_NAMES = ("ps_facts_mc", "ps_facts_gen")


@pytest.fixture(scope="module")
def real_llm(default_model_dir):
    return make_llm(default_model_dir, kv_cache_memory=128 << 20)


@pytest.fixture(scope="module")
def ref_model(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


def write_prefix_adapter(model, token_ids: list[int], out: Path) -> Path:
    """A PEFT prefix-tuning adapter whose virtual tokens are the KV the model computes for
    ``token_ids`` (so it means that text), written as ``PeftModel.save_pretrained`` does:
    ``prompt_embeddings`` [P, layers * 2 * kv_heads * head_dim] and PEFT's own config."""
    from peft import PrefixTuningConfig, TaskType

    kv = prefix_kv(model, token_ids)  # [L, 2, kv_heads, P, head_dim]
    layers, _, heads, length, dim = kv.shape
    table = kv.permute(3, 0, 1, 2, 4).reshape(length, layers * 2 * heads * dim)
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=length,
        num_layers=layers,
        num_attention_heads=heads,
        token_dim=heads * dim,
        inference_mode=True,
    )
    config.save_pretrained(str(out))
    save_file({"prompt_embeddings": table.contiguous()}, str(out / "adapter_model.safetensors"))
    return out


def model_args(url: str, model: str, tokenizer: Path) -> str:
    """``--model_args`` of docs/evaluation.md's command."""
    return ",".join(
        [
            f"model={model}",
            f"base_url={url}/v1/completions",
            f"tokenizer={tokenizer}",
            "tokenizer_backend=huggingface",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )


def run_lm_eval_cli(url: str, model: str, tokenizer: Path, out: Path) -> dict[str, list[dict]]:
    """``lm_eval run`` exactly as docs/evaluation.md gives it; the logged samples per task."""
    env = {
        **os.environ,
        "OPENAI_API_KEY": KEYS["acme"],
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1",
    }
    command = [
        *(sys.executable, "-m", "lm_eval", "run", "--model", "local-completions"),
        *("--model_args", model_args(url, model, tokenizer), "--tasks", ",".join(TASK_NAMES)),
        *("--include_path", str(TASKS), "--output_path", str(out), "--log_samples"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    samples = {}
    for task in TASK_NAMES:
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples


def run_lm_eval_inline(url: str, model: str, tokenizer: Path, monkeypatch) -> dict:
    """The same evaluation through lm_eval's Python entry point (what ``lm_eval run`` calls),
    in this process: it saves the command's start-up (a second import of lm_eval)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", KEYS["acme"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args(url, model, tokenizer),
        tasks=list(TASK_NAMES),
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
    )
    return results["samples"]


def arguments(sample: dict) -> list[tuple]:
    """A logged sample's request arguments: a list of tuples in memory, a dict of
    ``gen_args_i: {arg_0, arg_1}`` once written to JSON."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [(a["arg_0"], a["arg_1"]) for a in (args[f"gen_args_{i}"] for i in range(len(args)))]
    return [tuple(a) for a in args]


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's split of a request into token ids (a client's choice, redone here): trailing
    spaces of the context move to the continuation; the whole is encoded, then cut."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


def reference_loglikelihood(model, segments, context: list[int], continuation: list[int]):
    """Sum of log p(continuation[j] | segments, context, continuation[:j]), each term from
    its own run of the hand reference over that prefix."""
    total = 0.0
    for j, token in enumerate(continuation):
        step = greedy(model, context + continuation[:j], 1, segments, keep_logits=True)
        total += torch.log_softmax(step.logits[0], -1)[token].item()
    return total


def reference_generation(model, segments, tok, context: list[int], max_tokens: int) -> str:
    """Greedy text up to the first newline (the task's ``until``), EOS ending it; the steps
    that decide it must not be ties (else it would not be a fair comparison)."""
    ref = greedy(model, context, max_tokens, segments, ignore_eos=False)
    text = tok.decode(ref.tokens, skip_special_tokens=True)
    cut = text.find("\n")
    decisive = ref.tokens
    if cut >= 0:  # the tokens up to the one that wrote the newline
        decisive = next(
            ref.tokens[: i + 1]
            for i in range(len(ref.tokens))
            if "\n" in tok.decode(ref.tokens[: i + 1], skip_special_tokens=True)
        )
    assert ref.first_tie() is None or ref.first_tie() >= len(decisive), "reference tie"
    return text if cut < 0 else text[:cut]


def test_lm_eval_local_completions_equals_the_reference(
    make_server, real_llm, ref_model, default_model_dir, tmp_path, monkeypatch
):
    server = make_server(real_llm)
    tok = real_llm.tokenizer
    adapter_dir = write_prefix_adapter(ref_model, tok.encode(INSTRUCTION), tmp_path / "adapter")
    with server.http() as http:
        assert upload(http, ADAPTER, **files_of(adapter_dir)).status_code == 201
    figures = {}
    for model, segments in [
        (real_llm.model_id, []),
        (ADAPTER, [adapter_segment(ref_model, adapter_dir)]),
    ]:
        if segments:  # the adapter: the documented command itself
            samples = run_lm_eval_cli(server.url, model, default_model_dir, tmp_path / model)
        else:
            samples = run_lm_eval_inline(server.url, model, default_model_dir, monkeypatch)
        mc, gen = samples["ps_facts_mc"], samples["ps_facts_gen"]
        assert len(mc) == 6 and len(gen) == 4
        lls = []
        for sample in mc:
            got = [float(r[0][0]) for r in sample["resps"]]
            want = [
                reference_loglikelihood(ref_model, segments, *encode_pair(tok, context, choice))
                for context, choice in arguments(sample)
            ]
            assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < TOL, (got, want)
            best = max(range(len(want)), key=want.__getitem__)
            assert sample["acc"] == float(best == sample["doc"]["answer"])
            lls.append(got)
        for sample in gen:
            ((context, _),) = arguments(sample)
            ids = tok(context, add_special_tokens=False).input_ids
            want = reference_generation(ref_model, segments, tok, ids, 8)
            assert sample["resps"][0][0] == want, (sample["resps"], want)
        figures[model] = {
            "mc_acc": sum(s["acc"] for s in mc) / len(mc),
            "gen_exact_match": sum(s["exact_match"] for s in gen) / len(gen),
            "mc_loglikelihoods": lls,
            "gen_outputs": [s["resps"][0][0] for s in gen],
        }
    base, adapted = figures[real_llm.model_id], figures[ADAPTER]
    # The adapter is in front: every score moved.
    flat = zip(
        sum(base["mc_loglikelihoods"], []), sum(adapted["mc_loglikelihoods"], []), strict=True
    )
    assert all(abs(b - a) > 1e-3 for b, a in flat)
    print(json.dumps(figures, indent=1))
