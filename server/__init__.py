"""prefix-serve: one frozen base model, many prefix adapters, one server."""

from __future__ import annotations

from server.engine.request import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from server.llm import LLM

        return LLM
    raise AttributeError(name)
