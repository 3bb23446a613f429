"""Deterministic PEFT prompt-learning adapters for tests and benchmarks.

Each ``make_*`` function builds a real PEFT adapter (``get_peft_model`` with the matching config,
``task_type=CAUSAL_LM``), overwrites its learnable tensors with seeded random values of a
realistic scale, and writes it with ``save_pretrained``. The same (model, arguments) give the
same bytes on every run.

Scales, so that an adapter visibly changes the output while generations stay sane-ish:

- prefix tuning: each (layer, K/V, kv head, channel) is drawn from a normal with the mean and std
  of the base model's real cached keys/values (post-RoPE, as the cache holds them) over a fixed
  calibration sequence;
- prompt tuning: each hidden channel is drawn with the mean and std of the token embedding table;
- P-tuning: the encoder (PEFT's MLP) is seeded, then its last linear layer is rescaled so the
  saved output has the embedding table's per-channel mean and std.

``scale`` multiplies the std (1.0 = the base model's own spread). The bytes are a function of
the seed and of the base model's forward numerics (through the KV statistics): identical across
runs on one machine, possibly not bit-identical across CPU types.

The base model is wrapped in place, not copied: PEFT's prompt-learning methods add no modules
to the base model and change no weight; the only side effect, ``requires_grad=False`` on every
base parameter, is undone before returning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import DynamicCache, PreTrainedModel

# The calibration sequence for KV statistics: fixed, independent of the adapter's seed.
CALIBRATION_SEED = 1234
CALIBRATION_LENGTH = 128


def make_prefix_tuning(
    model: PreTrainedModel,
    out_dir: str | Path,
    num_virtual_tokens: int = 32,
    seed: int = 0,
    prefix_projection: bool = False,
    scale: float = 1.0,
    calibration_ids: Sequence[int] | None = None,
) -> Path:
    """Write a PREFIX_TUNING adapter for ``model`` into ``out_dir`` and return the directory.

    The saved ``prompt_embeddings`` is [num_virtual_tokens, L*2*kv_heads*head_dim]; row p viewed
    as [L*2, kv_heads, head_dim] gives layer l's key at 2l and value at 2l+1 (PEFT's layout).
    With ``prefix_projection=True`` PEFT saves the projected output, same shape; its MLP is
    seeded and its last layer rescaled to the same statistics.
    """
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
    )
    mean, std = _kv_stats(model, calibration_ids)  # [L*2*kv_heads*head_dim] each
    gen = torch.Generator().manual_seed(seed)
    with _wrapped(model, config) as peft_model:
        encoder = peft_model.prompt_encoder["default"]
        with torch.no_grad():
            if prefix_projection:
                _seed_module(encoder, gen)
                out = encoder(_tokens(encoder, num_virtual_tokens))
                _match_output(encoder.transform[-1], out, mean, std * scale)
            else:
                weight = encoder.embedding.weight
                noise = torch.randn(weight.shape, generator=gen)
                weight.copy_((mean + noise * std * scale).to(weight.dtype))
        peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_prompt_tuning(
    model: PreTrainedModel,
    out_dir: str | Path,
    num_virtual_tokens: int = 16,
    seed: int = 0,
    scale: float = 1.0,
) -> Path:
    """Write a PROMPT_TUNING adapter (soft prompt [num_virtual_tokens, hidden]) into ``out_dir``."""
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens)
    mean, std = _embedding_stats(model)
    gen = torch.Generator().manual_seed(seed)
    with _wrapped(model, config) as peft_model:
        weight = peft_model.prompt_encoder["default"].embedding.weight
        noise = torch.randn(weight.shape, generator=gen)
        with torch.no_grad():
            weight.copy_((mean + noise * std * scale).to(weight.dtype))
        peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_p_tuning(
    model: PreTrainedModel,
    out_dir: str | Path,
    num_virtual_tokens: int = 16,
    seed: int = 0,
    scale: float = 1.0,
) -> Path:
    """Write a P_TUNING adapter (MLP encoder) into ``out_dir``.

    PEFT saves the encoder's output [num_virtual_tokens, hidden], not the encoder.
    """
    config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        encoder_hidden_size=model.config.hidden_size,
    )
    mean, std = _embedding_stats(model)
    gen = torch.Generator().manual_seed(seed)
    with _wrapped(model, config) as peft_model:
        encoder = peft_model.prompt_encoder["default"]
        with torch.no_grad():
            _seed_module(encoder, gen)
            out = encoder(_tokens(encoder, num_virtual_tokens))
            _match_output(encoder.mlp_head[-1], out, mean, std * scale)
        peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the two warnings PEFT emits on every wrap and prompt-tuning generate here
    (a transformers deprecation inside PEFT; position ids dropped for soft prompts, which is
    PEFT's documented behaviour and what the reference wants)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message="Position ids are not supported.*")
        yield


@contextmanager
def _wrapped(model: PreTrainedModel, config) -> Iterator[PeftModel]:
    """Wrap ``model`` with a fresh prompt-learning adapter; restore ``requires_grad`` after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with quiet_peft():
            yield get_peft_model(model, config)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _tokens(encoder: torch.nn.Module, n: int) -> torch.Tensor:
    return torch.arange(n, device=encoder.embedding.weight.device).unsqueeze(0)


def _seed_module(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-draw every parameter from ``gen``: embeddings N(0, 1), linear weights N(0, 1/fan_in),
    biases N(0, 0.1^2); the output is rescaled afterwards, so only the shape of it matters."""
    for name, param in module.named_parameters():
        if param.dim() == 1:
            std = 0.1
        elif name.startswith("embedding"):
            std = 1.0
        else:
            std = param.shape[-1] ** -0.5
        param.copy_(torch.randn(param.shape, generator=gen) * std)


def _match_output(
    last: torch.nn.Linear, out: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> None:
    """Rescale ``last`` (the encoder's final linear) so its current output has per-channel
    ``mean`` and ``std``: out' = (out - m) / s * std + mean, folded into weight and bias."""
    out = out.reshape(-1, out.shape[-1]).float()
    mean, std = mean.to(out.device), std.to(out.device)
    ratio = std / out.std(dim=0, correction=0).clamp_min(1e-6)
    last.weight.mul_(ratio.unsqueeze(1))
    last.bias.copy_((last.bias - out.mean(dim=0)) * ratio + mean)


def _embedding_stats(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    table = model.get_input_embeddings().weight.detach().float()
    return table.mean(dim=0), table.std(dim=0)


@torch.no_grad()
def _kv_stats(
    model: PreTrainedModel, calibration_ids: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the cached keys/values, flattened in PEFT's row layout
    [L, 2, kv_heads, head_dim]."""
    if calibration_ids is None:
        gen = torch.Generator().manual_seed(CALIBRATION_SEED)
        vocab = model.config.vocab_size
        ids = torch.randint(min(1000, vocab // 2), vocab, (1, CALIBRATION_LENGTH), generator=gen)
    else:
        ids = torch.tensor([list(calibration_ids)])
    cache = DynamicCache(config=model.config)
    model(ids.to(model.device), past_key_values=cache, use_cache=True)
    per_layer = []
    for layer in cache.layers:
        kv = torch.stack([layer.keys[0], layer.values[0]]).float()  # [2, kv_heads, T, head_dim]
        per_layer.append((kv.mean(dim=2), kv.std(dim=2)))
    mean = torch.stack([m for m, _ in per_layer]).flatten().cpu()
    std = torch.stack([s for _, s in per_layer]).flatten().cpu()
    return mean, std
