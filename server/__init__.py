"""prefix-serve: one frozen base model, many prefix adapters, one server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.request import RequestOutput, SamplingParams

if TYPE_CHECKING:
    from server.llm import LLM

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> type[LLM]:
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from server.llm import LLM

        return LLM
    raise AttributeError(name)
