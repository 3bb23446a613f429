"""In-process Python API for offline batch jobs (see docs/api.md)::

from server import LLM, SamplingParams
llm = LLM()
llm.add_adapter("pirate", "path/to/peft_dir")
outs = llm.generate(["Hi", "Hello"], SamplingParams(max_tokens=32, temperature=0),
                    adapters=[["pirate"], []])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any, cast

from tqdm import tqdm

from adapters_store.formats import (
    AdapterLimits,
    CanonicalAdapter,
    ModelShape,
    parse_adapter,
    read_peft_dir,
    text_adapter,
)
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.request import AdapterSegment, InvalidRequest, RequestOutput, SamplingParams
from server.served_model import ServedModel, load_served_model, to_segment

__all__ = ["LLM", "Prompt", "to_segment"]

Prompt = str | Seq[int]


class LLM:
    """One base model and its adapters, generating in continuous batches in this process.

    Built on the same loading code as the server (``load_served_model``); ``served`` is that
    bundle (facts, tokenizer, engine), and the engine is driven by whoever calls
    ``generate``."""

    def __init__(
        self,
        model: str = "default",
        *,
        data_dir: str | Path = "./data",
        device: str = "auto",
        dtype: str = "auto",
        engine_config: EngineConfig | None = None,
        limits: AdapterLimits | None = None,
    ) -> None:
        self.served: ServedModel = load_served_model(
            model, data_dir=data_dir, device=device, dtype=dtype, engine_config=engine_config
        )
        self.limits = limits or AdapterLimits()
        self.adapters: dict[str, AdapterSegment] = {}
        self._ids = itertools.count()

    @property
    def model_id(self) -> str:
        return self.served.facts.model_id

    @property
    def tokenizer(self) -> Any:
        return self.served.tokenizer

    @property
    def shape(self) -> ModelShape:
        """What adapters are validated against (the model's shape and value scales)."""
        return self.served.facts.shape

    @property
    def engine(self) -> LLMEngine:
        return self.served.engine

    def add_adapter(self, name: str, path: str | Path) -> AdapterSegment:
        """Load a PEFT adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes it)."""
        config, weights = read_peft_dir(path)
        return self._register(name, parse_adapter(config, weights, self.shape, self.limits))

    def add_text_adapter(self, name: str, text: str) -> AdapterSegment:
        """A named text prefix (e.g. a system prompt), placed before the prompt's tokens."""
        return self._register(name, text_adapter(text, self.limits))

    def remove_adapter(self, name: str) -> None:
        seg = self.adapters.pop(name)
        if all(s.key != seg.key for s in self.adapters.values()):
            self.engine.runner.drop_adapter(seg.key)

    def _register(self, name: str, adapter: CanonicalAdapter) -> AdapterSegment:
        seg = to_segment(adapter, self.tokenizer)
        self.adapters[name] = seg
        return seg

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[Seq[str]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, or a list of token ids); outputs in order.

        ``adapters[i]`` names the adapters of prompt ``i``, composed in the order given.
        """
        # One prompt (a string or a list of token ids), or a list of prompts: told apart by
        # the first element, which mypy cannot narrow the union by.
        batch: Seq[Prompt]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch = [cast(Prompt, prompts)]
        else:
            batch = cast(Seq[Prompt], prompts)
        n = len(batch)
        params_list = list(params) if isinstance(params, Seq) else [params or SamplingParams()] * n
        names = list(adapters) if adapters is not None else [[] for _ in range(n)]
        if len(params_list) != n or len(names) != n:
            raise InvalidRequest("prompts, params and adapters must have the same length")
        ids: list[str] = []
        try:
            for prompt, p, adapter_names in zip(batch, params_list, names, strict=True):
                segs = [self._segment(a) for a in adapter_names]
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, self._tokens(prompt), p, segs)
                ids.append(rid)
        except Exception:
            # All or nothing: a rejected prompt takes the batch's earlier ones back out.
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def _segment(self, name: str) -> AdapterSegment:
        try:
            return self.adapters[name]
        except KeyError:
            raise InvalidRequest(f"unknown adapter {name!r}", "adapters") from None

    def _tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids: list[int] = self.tokenizer.encode(prompt, add_special_tokens=True)
            return ids
        return list(prompt)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        wanted = set(ids)
        while len(results) < len(ids) and self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]
