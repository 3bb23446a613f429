"""Where a W1 step's time goes: the engine's run of W1, timed by part.

    prefix-serve bench profile [--tenants 4] [--requests 4] [--new-tokens 32] [--dtype float32]
        [--attention auto|native|fused|reference]

Parts, each wall time summed over the run (CPU operators are synchronous, so timers around
them are exact; the timers themselves cost ~1 us each):

- weights: every ``nn.Linear`` of the model (projections, MLP, LM head);
- attention: each layer's ``attention.write_and_attend`` (the step's K/V written to the cache,
  then the shared-prefix attention), whichever path calls it;
- other model work: the rest of the forward (embedding, RMSNorm, rotary embedding, SiLU,
  residual adds, and the Python around them: the engine's decoder loop, or transformers'
  forward for layers the loop does not run);
- plan and metadata: the scheduler's plan, its flat arrays, the attention metadata;
- scheduler: ``schedule`` and ``update_from_output`` less the plan;
- sampler and text: token choice, detokenizing, stop checks and outputs;
- engine Python: the rest of ``LLMEngine.step``.

Decode and prefill steps are reported apart (a step with any multi-row chunk is prefill).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM

from bench.w1 import W1_ENGINE, _model_path
from bench.workloads import build_w1
from server.engine import attention, batch, cpu_kernels, engine, model_runner, scheduler
from server.engine.request import SamplingParams
from server.llm import LLM


class Timers:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.step_kind = "decode"

    @contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[f"{self.step_kind}:{name}"] += time.perf_counter() - start

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)
        timers = self

        def timed(*args, **kwargs):
            with timers.part(name):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)


def instrument(llm: LLM, timers: Timers) -> None:
    """Wrap the parts in timers (module functions by the names their callers look up)."""
    for module in llm.engine.runner.model.modules():
        if isinstance(module, torch.nn.Linear):
            timers.wrap(module, "forward", "weights")
        for joint in cpu_kernels.JOINT_PRODUCTS:
            if hasattr(module, joint):
                timers.wrap(module, joint, "weights")
    timers.wrap(attention, "write_and_attend", "attention")
    timers.wrap(model_runner, "flatten", "metadata")
    timers.wrap(model_runner, "build_metadata", "metadata")
    timers.wrap(scheduler, "build_plan", "plan")
    sched = llm.engine.scheduler
    timers.wrap(sched, "schedule", "scheduler")
    timers.wrap(sched, "update_from_output", "scheduler")
    timers.wrap(engine, "sample", "sampler and text")
    timers.wrap(llm.engine, "_after_token", "sampler and text")
    runner = llm.engine.runner
    run = runner.run

    def classified_run(plan: batch.BatchPlan):
        rows = [b - a for a, b in zip(plan.row_starts, plan.row_starts[1:], strict=False)]
        timers.step_kind = "prefill" if max(rows, default=0) > 1 else "decode"
        with timers.part("forward (total)"):
            return run(plan)

    runner.run = classified_run
    step = llm.engine.step

    def timed_step():
        with timers.part("step (total)"):
            return step()

    llm.engine.step = timed_step


def profile_w1(
    tenants: int,
    requests: int,
    new_tokens: int,
    dtype: str,
    model: str,
    data_dir: str,
    attention: str = "auto",
) -> dict:
    model_dir = _model_path(model, data_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    config = dataclasses.replace(W1_ENGINE, attention_backend=attention)
    llm = LLM(str(model_dir), data_dir=data_dir, device="cpu", dtype=dtype, engine_config=config)
    with tempfile.TemporaryDirectory() as tmp:
        wl = build_w1(base, llm.tokenizer, tmp, tenants, requests, new_tokens)
        for t, path in enumerate(wl.adapter_dirs):
            llm.add_adapter(f"tenant-{t}", path)
        prompts = [r.prompt_ids for r in wl.requests]
        names = [[f"tenant-{r.tenant}"] for r in wl.requests]
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0), names[:1], False)
        llm.engine.tree.clear_namespace(("default",))
        timers = Timers()
        instrument(llm, timers)
        steps_before = llm.engine.stats.steps
        start = time.perf_counter()
        llm.generate(prompts, params, adapters=names, use_tqdm=False)
        wall = time.perf_counter() - start
    return {
        "dtype": dtype,
        "attention": llm.engine.runner.attention_backend,
        "steps": llm.engine.stats.steps - steps_before,
        "wall_s": wall,
        "parts_s": dict(timers.totals),
    }


def format_profile(result: dict) -> str:
    parts = result["parts_s"]
    lines = [
        f"W1 engine profile, {result['dtype']}, {result['attention']} attention: "
        f"{result['steps']} steps, {result['wall_s']:.2f} s"
    ]
    for kind in ("prefill", "decode"):
        t = {name.split(":", 1)[1]: v for name, v in parts.items() if name.startswith(kind + ":")}
        step = t.get("step (total)", 0.0)
        if not step:
            continue
        forward = t.get("forward (total)", 0.0)
        table = {
            "weights (nn.Linear)": t.get("weights", 0.0),
            "attention": t.get("attention", 0.0),
            "other model work": forward
            - t.get("weights", 0.0)
            - t.get("attention", 0.0)
            - t.get("metadata", 0.0),
            "plan and metadata": t.get("plan", 0.0) + t.get("metadata", 0.0),
            "scheduler": t.get("scheduler", 0.0) - t.get("plan", 0.0),
            "sampler and text": t.get("sampler and text", 0.0),
        }
        table["engine Python"] = (
            step - forward - t.get("scheduler", 0.0) - table["sampler and text"]
        )
        lines.append(f"{kind} steps: {step:.2f} s")
        for name, seconds in table.items():
            lines.append(f"  {name:<22}{seconds:>8.3f} s {seconds / step:>6.1%}")
    return "\n".join(lines)
