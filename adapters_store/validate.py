"""Checks that turn untrusted PEFT adapter files into trusted values.

Every check raises `AdapterError` with `.param` naming what is wrong:
- `"config"` / `"weights"`: the file as a whole (missing, unreadable, too large, wrong structure);
- a config field name (`"peft_type"`, `"task_type"`, `"num_virtual_tokens"`, `"num_layers"`,
  `"num_attention_heads"`, `"token_dim"`, `"num_transformer_submodules"`, `"prefix_projection"`);
- `"text"` for text prefixes.

PEFT 0.21 facts these checks rely on (verified by tests/unit/test_adapter_formats.py):
- `save_pretrained` writes exactly one tensor, `prompt_embeddings`, for all three prompt-learning
  types; P-tuning saves the encoder's *output* (no encoder weights), prefix tuning with
  `prefix_projection=True` saves the *projected* prefix (same shape as without projection).
- Prefix tuning: `prompt_embeddings` is [P, num_layers * 2 * token_dim] with
  `token_dim = num_kv_heads * head_dim` and `num_attention_heads = num_kv_heads` (GQA-aware).
- Prompt tuning / P-tuning: `prompt_embeddings` is [P, hidden_size], `token_dim = hidden_size`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import safetensors.torch
import torch

from adapters_store.safetensors_header import HeaderError, read_header

WEIGHTS_KEY = "prompt_embeddings"
# The adapter kinds that carry a tensor (all but text prefixes).
TensorKind = Literal["prefix_tuning", "prompt_tuning", "p_tuning"]
# peft_type (as written in adapter_config.json) -> our adapter kind.
PEFT_TYPE_TO_KIND: dict[str, TensorKind] = {
    "PREFIX_TUNING": "prefix_tuning",
    "PROMPT_TUNING": "prompt_tuning",
    "P_TUNING": "p_tuning",
}
# PEFT saves prompt_embeddings in the dtype the model was trained in; float64 training of a
# served model is not a thing, and integer or bool values are not embeddings.
ACCEPTED_DTYPES = ("float32", "float16", "bfloat16")
# An adapter's values may be this many times larger than the largest the base model itself
# produces (its keys/values, its token embeddings). Trained adapters stay within a few times
# the model's own scale (a prefix trained from a text's KV: 0.95x); values far beyond it only
# overflow attention or the activations, which would fail every request using the adapter.
MAGNITUDE_MARGIN = 1000.0


class AdapterError(ValueError):
    """Bad adapter input.

    `.param` names what is wrong (see the module docstring); `str()` is a message a user can act
    on: what is wrong and what was expected.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterTooLargeError(AdapterError):
    """An adapter file or text is over a size limit (HTTP 413 rather than 400)."""


@dataclass(frozen=True)
class ModelShape:
    """What an adapter is validated against (read from the base model's config)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    # The largest magnitude the model itself produces (None: not measured, not checked):
    # keys/values (prefix tuning's values are compared with these) and token embeddings
    # (prompt and P-tuning's). Adapters may exceed them by MAGNITUDE_MARGIN.
    model_kv_abs: float | None = None
    model_embedding_abs: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {value!r}")

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read from a transformers `PretrainedConfig` of a Llama-family model.

        Uses the text config of multimodal models; `head_dim` falls back to
        `hidden_size // num_attention_heads`, `num_key_value_heads` to `num_attention_heads`.
        """
        get_text_config = getattr(config, "get_text_config", None)
        if get_text_config is not None:
            config = get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
        )

    @property
    def prefix_width(self) -> int:
        """Columns of prefix tuning's `prompt_embeddings`: layers x (K, V) x kv heads x dim."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class AdapterLimits:
    """Upper bounds on untrusted adapter input; byte limits apply before parsing."""

    max_virtual_tokens: int = 512
    max_file_bytes: int = 256 * 2**20  # adapter_model.safetensors
    max_config_bytes: int = 64 * 2**10  # adapter_config.json
    max_text_chars: int = 100_000


def check_size(size: int, limit: int, what: str, param: str) -> None:
    if size > limit:
        raise AdapterTooLargeError(
            f"{what} is {size} bytes; the limit is {limit} bytes", param=param
        )


def parse_config(config_bytes: bytes, limits: AdapterLimits) -> dict[str, Any]:
    """Parse adapter_config.json bytes into a dict (nothing about its fields is checked yet)."""
    check_size(len(config_bytes), limits.max_config_bytes, "adapter_config.json", "config")
    try:
        config = json.loads(config_bytes)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise AdapterError(
            f"adapter_config.json is not valid JSON ({exc}); expected the file that "
            "PeftModel.save_pretrained writes",
            param="config",
        ) from None
    if not isinstance(config, dict):
        raise AdapterError(
            f"adapter_config.json holds a JSON {type(config).__name__}; expected a JSON object",
            param="config",
        )
    return config


def check_config(
    config: dict[str, Any], shape: ModelShape, limits: AdapterLimits
) -> tuple[TensorKind, int]:
    """Check the config's fields against the supported types and the base model.

    Returns (kind, num_virtual_tokens). Fields that PEFT fills in but that are absent or null
    here are not required: the weights' shape is checked against the model regardless.
    """
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_KIND:
        raise AdapterError(
            f"peft_type {_show(peft_type)} is not supported; supported types: "
            f"{', '.join(PEFT_TYPE_TO_KIND)} (prefix adapters only, LoRA and other "
            "weight-changing adapters are not served)",
            param="peft_type",
        )
    kind = PEFT_TYPE_TO_KIND[peft_type]
    task_type = config.get("task_type")
    if task_type is not None and task_type != "CAUSAL_LM":
        raise AdapterError(
            f"task_type {_show(task_type)} is not supported; expected 'CAUSAL_LM'",
            param="task_type",
        )
    num_virtual_tokens = _check_num_virtual_tokens(config.get("num_virtual_tokens"), limits)
    _expect_field(config, "num_transformer_submodules", 1, "for a decoder-only (CAUSAL_LM) model")
    if kind == "prefix_tuning":
        _check_prefix_fields(config, shape)
    else:
        _expect_field(config, "token_dim", shape.hidden_size, "(the base model's hidden size)")
    return kind, num_virtual_tokens


def _check_num_virtual_tokens(value: Any, limits: AdapterLimits) -> int:
    if value is None:
        raise AdapterError(
            "adapter_config.json has no num_virtual_tokens; expected a positive integer",
            param="num_virtual_tokens",
        )
    if not _is_int(value) or value <= 0:
        raise AdapterError(
            f"num_virtual_tokens is {_show(value)}; expected a positive integer",
            param="num_virtual_tokens",
        )
    if value > limits.max_virtual_tokens:
        raise AdapterError(
            f"num_virtual_tokens is {_show(value)}; this server accepts at most "
            f"{limits.max_virtual_tokens} virtual tokens",
            param="num_virtual_tokens",
        )
    return value


def _check_prefix_fields(config: dict[str, Any], shape: ModelShape) -> None:
    projection = config.get("prefix_projection")
    if projection is not None and not isinstance(projection, bool):
        raise AdapterError(
            f"prefix_projection is {_show(projection)}; expected true or false",
            param="prefix_projection",
        )
    _expect_field(config, "num_layers", shape.num_layers, "(the base model's layer count)")
    _expect_field(
        config,
        "num_attention_heads",
        shape.num_kv_heads,
        "(the base model's kv heads; PEFT >= 0.12 stores the kv head count for grouped-query "
        "attention models, so this adapter was made with an older PEFT or for another model)",
    )
    _expect_field(
        config,
        "token_dim",
        shape.num_kv_heads * shape.head_dim,
        f"({shape.num_kv_heads} kv heads x {shape.head_dim} head dim)",
    )


def _expect_field(config: dict[str, Any], name: str, expected: int, why: str) -> None:
    value = config.get(name)
    if value is None:
        return
    if not _is_int(value):
        raise AdapterError(f"{name} is {_show(value)}; expected an integer", param=name)
    if value != expected:
        raise AdapterError(
            f"adapter_config.json has {name}={_show(value)}; the base model needs {expected} {why}",
            param=name,
        )


def _show(value: Any, most: int = 60) -> str:
    """repr() of an untrusted value, cut short so an error message stays readable."""
    text = repr(value)
    return text if len(text) <= most else text[:most] + "..."


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def load_weights(weights_bytes: bytes, kind: str, limits: AdapterLimits) -> torch.Tensor:
    """Deserialize adapter_model.safetensors (never pickle) and return its one tensor.

    The header is checked first (``safetensors_header.read_header``): the tensor is the
    `prompt_embeddings` key, exactly, in a float dtype; nothing is decoded before that. It is
    returned as a new float32 tensor that owns its memory. Its shape is not checked here.
    """
    check_size(len(weights_bytes), limits.max_file_bytes, "adapter_model.safetensors", "weights")
    try:
        entries = read_header(weights_bytes)
    except HeaderError as exc:
        if exc.too_large:
            raise AdapterTooLargeError(
                f"adapter_model.safetensors is too large: {exc}", param="weights"
            ) from None
        raise AdapterError(
            f"adapter_model.safetensors is not a valid safetensors file: {exc}", param="weights"
        ) from None
    if WEIGHTS_KEY not in entries:
        raise AdapterError(
            f"adapter_model.safetensors has no {WEIGHTS_KEY!r} tensor (found: "
            f"{_names(entries)}); PEFT saves {kind} adapters as that one tensor",
            param="weights",
        )
    extra = [name for name in entries if name != WEIGHTS_KEY]
    if extra:
        raise AdapterError(
            f"adapter_model.safetensors has unexpected tensor(s) {_names(extra)}; expected "
            f"exactly one, {WEIGHTS_KEY!r} (adapters with modules_to_save or resized "
            "embeddings are not supported)",
            param="weights",
        )
    dtype = entries[WEIGHTS_KEY].dtype_name
    if dtype not in ACCEPTED_DTYPES:
        raise AdapterError(
            f"{WEIGHTS_KEY} has dtype {dtype}; expected float32, float16 or bfloat16",
            param="weights",
        )
    try:
        tensor = safetensors.torch.load(weights_bytes)[WEIGHTS_KEY]
    except Exception as exc:  # SafetensorError: whatever read_header did not foresee
        raise AdapterError(
            f"adapter_model.safetensors is not a valid safetensors file ({exc}); expected the "
            "file that PeftModel.save_pretrained writes",
            param="weights",
        ) from None
    return tensor.to(dtype=torch.float32, copy=True)


def _names(names: Iterable[str], most: int = 5) -> str:
    ordered = sorted(names)
    if not ordered:
        return "none"
    shown = [repr(name[:64]) for name in ordered[:most]]
    more = len(ordered) - most
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def check_weights(
    tensor: torch.Tensor, kind: str, num_virtual_tokens: int, shape: ModelShape
) -> None:
    """Check a float32 `prompt_embeddings` tensor's shape against the config and model, and
    that every value is finite."""
    if kind == "prefix_tuning":
        width = shape.prefix_width
        why = (
            f"{shape.num_layers} layers x 2 x {shape.num_kv_heads} kv heads x "
            f"{shape.head_dim} head dim"
        )
    else:
        width, why = shape.hidden_size, f"hidden size {shape.hidden_size}"
    got = list(tensor.shape)
    if tensor.dim() == 2 and got[0] != num_virtual_tokens:
        raise AdapterError(
            f"adapter_config.json has num_virtual_tokens={num_virtual_tokens} but "
            f"{WEIGHTS_KEY} has {got[0]} rows; they must agree",
            param="num_virtual_tokens",
        )
    if got != [num_virtual_tokens, width]:
        raise AdapterError(
            f"{kind} weights have shape {got}; the base model needs "
            f"[{num_virtual_tokens}, {width}] ({why})",
            param="weights",
        )
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        row, col = (int(i) for i in bad[0])
        raise AdapterError(
            f"{WEIGHTS_KEY} has {bad.shape[0]} NaN or infinite value(s) (first at row {row}, "
            f"column {col}: {tensor[row, col].item()}); expected finite numbers",
            param="weights",
        )
    _check_magnitude(tensor, kind, shape)


def _check_magnitude(tensor: torch.Tensor, kind: str, shape: ModelShape) -> None:
    if kind == "prefix_tuning":
        scale, what = shape.model_kv_abs, "key/value"
    else:
        scale, what = shape.model_embedding_abs, "token embedding"
    if scale is None or tensor.numel() == 0:
        return
    limit = MAGNITUDE_MARGIN * max(scale, 1.0)
    peak = float(tensor.abs().max())
    if peak > limit:
        raise AdapterError(
            f"{WEIGHTS_KEY} holds values up to {peak:.3g} in magnitude; this model accepts at "
            f"most {limit:.3g} ({MAGNITUDE_MARGIN:g}x the largest {what} it produces itself, "
            f"{scale:.3g}): values this large overflow the model's attention or activations",
            param="weights",
        )


def check_text(text: Any, limits: AdapterLimits) -> bytes:
    """Check a text prefix; returns its UTF-8 encoding."""
    if not isinstance(text, str):
        raise AdapterError(f"text must be a string, got {type(text).__name__}", param="text")
    if not text:
        raise AdapterError("text is empty; expected at least one character", param="text")
    if len(text) > limits.max_text_chars:
        raise AdapterTooLargeError(
            f"text is {len(text)} characters; the limit is {limits.max_text_chars}",
            param="text",
        )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AdapterError(
            f"text is not valid Unicode (unpaired surrogate at character {exc.start})",
            param="text",
        ) from None
