"""The model a server (or the in-process ``LLM``) serves: loaded once, by one function.

``load_served_model`` finds and loads the base model, measures what adapters are validated
against, builds the engine, and publishes the model's ``ModelFacts``: plain, frozen values
fixed for the model's lifetime. The HTTP layer reads those facts and the tokenizer from any
thread; the engine inside the bundle belongs to the thread that drives it (the server's
engine thread, or the caller of ``LLM.generate``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.engine.request import AdapterSegment

if TYPE_CHECKING:
    from adapters_store.formats import CanonicalAdapter, ModelShape
    from server.engine.engine import EngineConfig, LLMEngine


@dataclass(frozen=True)
class ModelFacts:
    """What the loaded model bounds and names, fixed once it is loaded; safe from any thread.

    - ``model_id``: the id clients send as ``model``.
    - ``max_model_len``: the context, in positions (adapters' virtual tokens, prompt and
      output together): the least of the model's position limit, its sliding window and the
      KV pool's capacity, exactly what the engine checks each request against.
    - ``vocab_size``: prompt token ids must lie in ``[0, vocab_size)``.
    - ``eos_token_ids``: the ids that end generation (tokenizer's and generation config's).
    - ``shape``: what an uploaded adapter is validated against, with the magnitudes the
      model itself produces (measured before prefix-serve's attention is installed).
    - ``block_size``, ``num_kv_blocks``: the KV pool's geometry.
    - ``max_num_seqs``: the most sequences the engine runs at once.
    - ``device``, ``dtype``: where and how the weights and KV cache live (``"cpu"``,
      ``"float32"``...).
    """

    model_id: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    shape: ModelShape
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    device: str
    dtype: str


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One loaded model: its facts, its tokenizer and the engine that runs it.

    Thread ownership: ``facts`` is immutable and ``tokenizer`` is only read (encode, chat
    templates), so both are safe from the event loop and worker threads; ``engine`` is touched
    only by the thread that drives it (``AsyncEngine``'s engine thread in the server)."""

    facts: ModelFacts
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    engine: LLMEngine


def load_served_model(
    model: str = "default",
    *,
    data_dir: str | Path = "./data",
    device: str = "auto",
    dtype: str = "auto",
    engine_config: EngineConfig | None = None,
) -> ServedModel:
    """Load ``model`` (``default``, an HF directory or a ``.gguf`` file), build its engine and
    publish its facts. Runs torch: call it in the thread that will run the engine."""
    # Imported here: torch and transformers load only when a model does.
    from adapters_store.formats import ModelShape
    from server.engine.engine import EngineConfig, LLMEngine
    from server.model_loader import load_base_model, model_value_scales

    base = load_base_model(model, data_dir, device, dtype)
    # Measured before the engine routes attention through prefix-serve's function.
    kv_abs, embedding_abs = model_value_scales(base.model)
    shape = replace(
        ModelShape.from_config(base.model.config),
        model_kv_abs=kv_abs,
        model_embedding_abs=embedding_abs,
    )
    config = engine_config or EngineConfig()
    engine = LLMEngine(base.model, base.tokenizer, config)
    facts = ModelFacts(
        model_id=base.model_id,
        max_model_len=engine.max_model_len,
        vocab_size=int(base.model.config.vocab_size),  # the bound add_request checks
        eos_token_ids=tuple(engine.eos_ids),
        shape=shape,
        block_size=config.block_size,
        num_kv_blocks=engine.pool.num_blocks,
        max_num_seqs=config.max_num_seqs,
        device=str(engine.runner.device),
        dtype=str(engine.runner.dtype).removeprefix("torch."),
    )
    return ServedModel(facts, base.tokenizer, engine)


def to_segment(adapter: CanonicalAdapter, tokenizer: Any) -> AdapterSegment:
    """The engine's view of a validated adapter (text prefixes are tokenized here)."""
    if adapter.kind == "text":
        ids = tuple(tokenizer.encode(adapter.text, add_special_tokens=False))
        return AdapterSegment(adapter.sha256, "text", len(ids), token_ids=ids)
    return AdapterSegment(
        adapter.sha256,
        adapter.kind,
        adapter.num_virtual_tokens,
        kv=adapter.kv,
        embeddings=adapter.embeddings,
    )
