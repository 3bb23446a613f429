"""Baselines A and B of docs/benchmarks.md: what a user would do with PEFT alone.

A, per request: one ``PeftModel`` holding every tenant's adapter by name; for each request,
``set_adapter`` and greedy ``generate`` of N tokens, one request at a time.
B, batch per adapter: per tenant, ``set_adapter`` and one left-padded greedy ``generate`` over
all that tenant's requests (PEFT cannot mix prefix adapters in one batch).

EOS is ignored (``eos_token_id=None``: EOS may be generated but does not stop), so every
request yields exactly N tokens. Adapters are loaded before the clock starts; only generation
(including the per-call ``set_adapter``) is timed.

Run through ``prefix-serve bench w1``, which times the engine and both baselines side by side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from bench.peft_adapters import quiet_peft
from bench.peft_reference import left_pad
from bench.workloads import Workload


@dataclass(frozen=True)
class BaselineResult:
    """``tokens`` in the workload's request order; ``seconds`` is generation wall time."""

    name: str
    tokens: list[list[int]]
    seconds: float

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tok_per_s(self) -> float:
        return self.generated / self.seconds


def baseline_a(base_model: PreTrainedModel, workload: Workload) -> BaselineResult:
    """One request at a time, ``set_adapter`` per request."""
    with _all_adapters(base_model, workload) as model:
        _warm_up(model, workload)
        tokens = []
        start = time.perf_counter()
        for request in workload.requests:
            model.set_adapter(_name(request.tenant))
            tokens.extend(_generate(model, [request.prompt_ids], workload.new_tokens))
        seconds = time.perf_counter() - start
    return BaselineResult("A", tokens, seconds)


def baseline_b(base_model: PreTrainedModel, workload: Workload) -> BaselineResult:
    """Per tenant, all its requests in one left-padded batch."""
    with _all_adapters(base_model, workload) as model:
        _warm_up(model, workload)
        by_request: dict[int, list[int]] = {}
        start = time.perf_counter()
        for tenant, requests in enumerate(workload.by_tenant()):
            model.set_adapter(_name(tenant))
            prompts = [r.prompt_ids for r in requests]
            for request, out in zip(
                requests, _generate(model, prompts, workload.new_tokens), strict=True
            ):
                by_request[id(request)] = out
        seconds = time.perf_counter() - start
    return BaselineResult("B", [by_request[id(r)] for r in workload.requests], seconds)


def _name(tenant: int) -> str:
    return f"tenant-{tenant}"


@contextmanager
def _all_adapters(base_model: PreTrainedModel, workload: Workload) -> Iterator[PeftModel]:
    """Wrap ``base_model`` in place with every tenant's adapter; restore ``requires_grad``."""
    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    try:
        with quiet_peft():
            dirs = workload.adapter_dirs
            model = PeftModel.from_pretrained(base_model, str(dirs[0]), adapter_name=_name(0))
            for tenant, path in enumerate(dirs[1:], start=1):
                model.load_adapter(str(path), adapter_name=_name(tenant))
            model.eval()
            yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _warm_up(model: PeftModel, workload: Workload) -> None:
    """One short untimed generation, so one-time costs (allocator, kernels) stay off the clock."""
    model.set_adapter(_name(0))
    _generate(model, [workload.requests[0].prompt_ids], 2)


@torch.no_grad()
def _generate(model: PeftModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    pad_id = model.get_base_model().generation_config.pad_token_id or 0
    input_ids, attention_mask = left_pad(prompts, pad_id=pad_id)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad_id,
    )
    return out[:, input_ids.shape[1] :].tolist()
