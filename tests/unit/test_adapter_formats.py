"""PEFT adapter files -> CanonicalAdapter, checked against what PEFT 0.21 itself saves and loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from safetensors.torch import save as st  # tensors -> safetensors file bytes
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from adapters_store.formats import (
    AdapterError,
    AdapterLimits,
    AdapterTooLargeError,
    ModelShape,
    parse_adapter,
    read_peft_dir,
    text_adapter,
)

P = 5
SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, vocab_size=128)
PREFIX_WIDTH = 2 * 2 * 2 * 16  # layers x (K, V) x kv heads x head dim


def llama_config(**overrides: Any) -> LlamaConfig:
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: prefix KV has 2 heads, not 4
        vocab_size=128,
    )
    return LlamaConfig(**(kwargs | overrides))


PEFT_CONFIGS = {
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "prefix_projection": lambda: PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24
    ),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "p_tuning": lambda: PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=24
    ),
}


@dataclass
class Saved:
    dir: Path
    trained_prompt: Any  # get_prompt(1) of the model that saved it (trainable, encoders run)

    @property
    def config(self) -> dict:
        return json.loads((self.dir / "adapter_config.json").read_bytes())

    @property
    def files(self) -> tuple[bytes, bytes]:
        return (
            (self.dir / "adapter_config.json").read_bytes(),
            (self.dir / "adapter_model.safetensors").read_bytes(),
        )

    def loaded_prompt(self) -> Any:
        """What PEFT's own loader makes of the saved directory."""
        model = PeftModel.from_pretrained(LlamaForCausalLM(llama_config()), self.dir)
        with torch.no_grad():
            return model.get_prompt(batch_size=1)


def save_adapter(directory: Path, peft_config: Any, **model_overrides: Any) -> Saved:
    model = get_peft_model(LlamaForCausalLM(llama_config(**model_overrides)), peft_config)
    model.save_pretrained(directory)
    with torch.no_grad():
        return Saved(directory, model.get_prompt(batch_size=1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Saved]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_adapter(root / name, make()) for name, make in PEFT_CONFIGS.items()}


def cfg(config: dict, **changes: Any) -> bytes:
    return json.dumps(config | changes).encode()


# --- the model shape -------------------------------------------------------------------------


def test_model_shape_from_gqa_llama_config() -> None:
    assert ModelShape.from_config(llama_config()) == SHAPE
    assert ModelShape.from_config(llama_config(head_dim=8)) == ModelShape(2, 2, 8, 64, 128)
    assert SHAPE.prefix_width == PREFIX_WIDTH
    bare = SimpleNamespace(  # no head_dim, no num_key_value_heads: MHA, hidden // heads
        num_hidden_layers=3, num_attention_heads=4, hidden_size=64, vocab_size=10
    )
    assert ModelShape.from_config(bare) == ModelShape(3, 4, 16, 64, 10)


# --- real PEFT output -> canonical form --------------------------------------------------------


@pytest.mark.parametrize("name", ["prefix", "prefix_projection"])
def test_prefix_tuning_kv_equals_peft_get_prompt(saved: dict[str, Saved], name: str) -> None:
    adapter = parse_adapter(*saved[name].files, SHAPE)
    assert adapter.kind == "prefix_tuning"
    assert adapter.num_virtual_tokens == P
    assert adapter.embeddings is None and adapter.text is None
    assert adapter.peft_config == saved[name].config
    kv = adapter.kv
    assert kv.dtype == torch.float32 and kv.is_contiguous()
    assert tuple(kv.shape) == (2, 2, 2, P, 16)  # [L, 2, H_kv, P, D]
    for cache in (saved[name].loaded_prompt(), saved[name].trained_prompt):
        assert isinstance(cache, DynamicCache)
        assert len(cache.layers) == 2
        for layer in range(2):
            assert tuple(cache.layers[layer].keys.shape) == (1, 2, P, 16)
            assert torch.equal(kv[layer, 0], cache.layers[layer].keys[0])
            assert torch.equal(kv[layer, 1], cache.layers[layer].values[0])


def test_prefix_projection_is_saved_projected(saved: dict[str, Saved]) -> None:
    config = saved["prefix_projection"].config
    assert config["prefix_projection"] is True
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (2, 2, 32)
    # Same [P, L*2*H_kv*D] tensor as without projection: the MLP's output, not the MLP.
    assert parse_adapter(*saved["prefix_projection"].files, SHAPE).kv.shape == (2, 2, 2, P, 16)


@pytest.mark.parametrize(("name", "kind"), [("prompt", "prompt_tuning"), ("p_tuning", "p_tuning")])
def test_prompt_embeddings_equal_peft_get_prompt(
    saved: dict[str, Saved], name: str, kind: str
) -> None:
    adapter = parse_adapter(*saved[name].files, SHAPE)
    assert adapter.kind == kind
    assert adapter.num_virtual_tokens == P
    assert adapter.kv is None and adapter.text is None
    assert adapter.peft_config == saved[name].config
    assert adapter.embeddings.dtype == torch.float32
    assert tuple(adapter.embeddings.shape) == (P, 64)
    loaded = saved[name].loaded_prompt()
    assert tuple(loaded.shape) == (1, P, 64)
    assert torch.equal(adapter.embeddings, loaded[0])
    # For P-tuning this is the prompt encoder's output (PEFT saves no encoder weights).
    assert torch.equal(adapter.embeddings, saved[name].trained_prompt[0])


def test_prefix_kv_layout() -> None:
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}
    e = torch.arange(3 * PREFIX_WIDTH, dtype=torch.float32).view(3, PREFIX_WIDTH)
    kv = parse_adapter(cfg(config), st({"prompt_embeddings": e}), SHAPE).kv
    for layer, k_or_v, head, pos, d in [(0, 0, 0, 0, 0), (1, 1, 1, 2, 15), (1, 0, 1, 1, 3)]:
        column = ((layer * 2 + k_or_v) * 2 + head) * 16 + d
        assert kv[layer, k_or_v, head, pos, d] == e[pos, column]


def test_half_precision_weights_become_float32(saved: dict[str, Saved]) -> None:
    config = saved["prompt"].files[0]
    e = torch.randn(P, 64)
    for dtype in (torch.float16, torch.bfloat16):
        adapter = parse_adapter(config, st({"prompt_embeddings": e.to(dtype)}), SHAPE)
        assert adapter.embeddings.dtype == torch.float32
        assert torch.equal(adapter.embeddings, e.to(dtype).float())


def test_config_kept_as_given_with_missing_optional_fields() -> None:
    config = {"peft_type": "P_TUNING", "num_virtual_tokens": 2, "custom": [1]}
    adapter = parse_adapter(cfg(config), st({"prompt_embeddings": torch.ones(2, 64)}), SHAPE)
    assert adapter.kind == "p_tuning"
    assert adapter.peft_config == config


# --- content hash -------------------------------------------------------------------------------


def test_sha256_is_deterministic_over_canonical_content(saved: dict[str, Saved]) -> None:
    files = saved["prompt"].files
    first = parse_adapter(*files, SHAPE)
    assert parse_adapter(*files, SHAPE).sha256 == first.sha256
    expected = hashlib.sha256(
        b"prefix-serve/adapter/v1\0prompt_tuning\0"
        + b"5x64\0float32le\0"
        + first.embeddings.numpy().tobytes()
    ).hexdigest()
    assert first.sha256 == expected
    # Same values in a float16 file and a float32 file: same content, same hash.
    e = torch.randn(P, 64).half()
    half = parse_adapter(files[0], st({"prompt_embeddings": e}), SHAPE)
    full = parse_adapter(files[0], st({"prompt_embeddings": e.float()}), SHAPE)
    assert half.sha256 == full.sha256
    # The config is not content: another base_model_name_or_path, same hash.
    renamed = cfg(saved["prompt"].config, base_model_name_or_path="x")
    assert parse_adapter(renamed, files[1], SHAPE).sha256 == first.sha256


def test_sha256_differs_when_content_or_kind_differs(saved: dict[str, Saved]) -> None:
    config, weights = saved["prompt"].files
    e = parse_adapter(config, weights, SHAPE).embeddings.clone()
    e[4, 63] += 1.0
    changed = parse_adapter(config, st({"prompt_embeddings": e}), SHAPE)
    assert changed.sha256 != parse_adapter(config, weights, SHAPE).sha256
    as_p_tuning = cfg(json.loads(config), peft_type="P_TUNING")
    assert parse_adapter(as_p_tuning, st({"prompt_embeddings": e}), SHAPE).sha256 != changed.sha256
    hashes = {parse_adapter(*saved[name].files, SHAPE).sha256 for name in PEFT_CONFIGS}
    assert len(hashes) == 4


# --- bad adapters --------------------------------------------------------------------------------

# Changes to the real prefix adapter's config (None deletes the field): (id, changes, limits,
# param, message substring).
# fmt: off
BAD_CONFIGS = [
    ("lora", {"peft_type": "LORA"}, None, "peft_type", "peft_type 'LORA' is not supported; "
     "supported types: PREFIX_TUNING, PROMPT_TUNING, P_TUNING"),
    ("no_type", {"peft_type": None}, None, "peft_type", "peft_type None is not supported"),
    ("list_type", {"peft_type": ["LORA"]}, None, "peft_type", "peft_type ['LORA'] is not"),
    ("long_task", {"task_type": "X" * 9999}, None, "task_type",
     "task_type 'XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX... is not supported"),
    ("seq_cls", {"task_type": "SEQ_CLS"}, None, "task_type",
     "task_type 'SEQ_CLS' is not supported; expected 'CAUSAL_LM'"),
    ("p_zero", {"num_virtual_tokens": 0}, None, "num_virtual_tokens",
     "num_virtual_tokens is 0; expected a positive integer"),
    ("p_negative", {"num_virtual_tokens": -3}, None, "num_virtual_tokens",
     "num_virtual_tokens is -3; expected a positive integer"),
    ("p_string", {"num_virtual_tokens": "5"}, None, "num_virtual_tokens",
     "num_virtual_tokens is '5'; expected a positive integer"),
    ("p_bool", {"num_virtual_tokens": True}, None, "num_virtual_tokens", "is True; expected"),
    ("p_float", {"num_virtual_tokens": 5.0}, None, "num_virtual_tokens", "is 5.0; expected"),
    ("p_missing", {"num_virtual_tokens": None}, None, "num_virtual_tokens",
     "adapter_config.json has no num_virtual_tokens"),
    ("p_over_default", {"num_virtual_tokens": 513}, None, "num_virtual_tokens",
     "num_virtual_tokens is 513; this server accepts at most 512 virtual tokens"),
    ("p_over_limit", {}, AdapterLimits(max_virtual_tokens=4), "num_virtual_tokens",
     "num_virtual_tokens is 5; this server accepts at most 4 virtual tokens"),
    ("p_vs_rows", {"num_virtual_tokens": 4}, None, "num_virtual_tokens",
     "adapter_config.json has num_virtual_tokens=4 but prompt_embeddings has 5 rows"),
    ("num_layers", {"num_layers": 3}, None, "num_layers",
     "adapter_config.json has num_layers=3; the base model needs 2"),
    ("full_heads", {"num_attention_heads": 4}, None, "num_attention_heads",
     "num_attention_heads=4; the base model needs 2 (the base model's kv heads; PEFT >= 0.12"),
    ("token_dim", {"token_dim": 64}, None, "token_dim",
     "token_dim=64; the base model needs 32 (2 kv heads x 16 head dim)"),
    ("token_dim_type", {"token_dim": "32"}, None, "token_dim", "token_dim is '32'; expected"),
    ("submodules", {"num_transformer_submodules": 2}, None, "num_transformer_submodules",
     "num_transformer_submodules=2; the base model needs 1"),
    ("projection_type", {"prefix_projection": "yes"}, None, "prefix_projection",
     "prefix_projection is 'yes'; expected true or false"),
]
# fmt: on


@pytest.mark.parametrize(
    ("changes", "limits", "param", "message"),
    [case[1:] for case in BAD_CONFIGS],
    ids=[case[0] for case in BAD_CONFIGS],
)
def test_bad_prefix_config(
    saved: dict[str, Saved], changes: dict, limits: Any, param: str, message: str
) -> None:
    config = {k: v for k, v in (saved["prefix"].config | changes).items() if v is not None}
    with pytest.raises(AdapterError) as info:
        parse_adapter(cfg(config), saved["prefix"].files[1], SHAPE, limits or AdapterLimits())
    assert info.value.param == param
    assert message in str(info.value)


GOOD = torch.randn(P, PREFIX_WIDTH)
NAN = GOOD.clone().index_put_((torch.tensor(2), torch.tensor(7)), torch.tensor(float("nan")))
SHAPE_NEEDED = "the base model needs [5, 128] (2 layers x 2 x 2 kv heads x 16 head dim)"
# Tensors saved with the real prefix adapter's config: (id, tensors, param, message substring).
# fmt: off
BAD_WEIGHTS = [
    ("extra_tensor", {"prompt_embeddings": GOOD, "extra": torch.ones(1)}, "weights",
     "unexpected tensor(s) 'extra'; expected exactly one, 'prompt_embeddings'"),
    ("missing_tensor", {"prefix_encoder.embedding.weight": GOOD}, "weights",
     "has no 'prompt_embeddings' tensor (found: 'prefix_encoder.embedding.weight')"),
    ("int_dtype", {"prompt_embeddings": GOOD.long()}, "weights",
     "prompt_embeddings has dtype int64; expected float32, float16 or bfloat16"),
    ("float64", {"prompt_embeddings": GOOD.double()}, "weights", "has dtype float64; expected"),
    ("nan", {"prompt_embeddings": NAN}, "weights",
     "prompt_embeddings has 1 NaN or infinite value(s) (first at row 2, column 7: nan)"),
    ("inf", {"prompt_embeddings": torch.full((P, PREFIX_WIDTH), float("-inf"))}, "weights",
     f"has {P * PREFIX_WIDTH} NaN or infinite value(s) (first at row 0, column 0: -inf)"),
    ("rows_plus_one", {"prompt_embeddings": torch.randn(P + 1, PREFIX_WIDTH)},
     "num_virtual_tokens", "num_virtual_tokens=5 but prompt_embeddings has 6 rows"),
    ("layers_plus_one", {"prompt_embeddings": torch.randn(P, 3 * 2 * 2 * 16)}, "weights",
     f"prefix_tuning weights have shape [5, 192]; {SHAPE_NEEDED}"),
    ("kv_heads_minus_one", {"prompt_embeddings": torch.randn(P, 2 * 2 * 1 * 16)}, "weights",
     f"prefix_tuning weights have shape [5, 64]; {SHAPE_NEEDED}"),
    ("head_dim_plus_one", {"prompt_embeddings": torch.randn(P, 2 * 2 * 2 * 17)}, "weights",
     f"prefix_tuning weights have shape [5, 136]; {SHAPE_NEEDED}"),
    ("one_dim", {"prompt_embeddings": GOOD.flatten()}, "weights",
     f"prefix_tuning weights have shape [640]; {SHAPE_NEEDED}"),
    ("three_dim", {"prompt_embeddings": GOOD.view(P, 4, 32)}, "weights",
     f"prefix_tuning weights have shape [5, 4, 32]; {SHAPE_NEEDED}"),
]
# fmt: on


@pytest.mark.parametrize(
    ("tensors", "param", "message"),
    [case[1:] for case in BAD_WEIGHTS],
    ids=[case[0] for case in BAD_WEIGHTS],
)
def test_bad_prefix_weights(
    saved: dict[str, Saved], tensors: dict, param: str, message: str
) -> None:
    with pytest.raises(AdapterError) as info:
        parse_adapter(saved["prefix"].files[0], st(tensors), SHAPE)
    assert info.value.param == param
    assert message in str(info.value)


NOT_JSON = "adapter_config.json is not valid JSON"
NOT_SAFETENSORS = "adapter_model.safetensors is not a valid safetensors file"
# fmt: off
BAD_BYTES = [  # (id, config bytes or None for the real one, weights likewise, param, message)
    ("bad_json", b"{not json", None, "config", NOT_JSON),
    ("not_utf8", b"\x80\x81", None, "config", NOT_JSON),
    ("empty_config", b"", None, "config", NOT_JSON),
    ("json_list", b"[1, 2]", None, "config", "holds a JSON list; expected a JSON object"),
    ("json_str", b'"PREFIX_TUNING"', None, "config", "holds a JSON str; expected a JSON object"),
    ("truncated", None, lambda w: w[:-1], "weights", NOT_SAFETENSORS),
    ("header_only", None, lambda w: w[:20], "weights", NOT_SAFETENSORS),
    ("garbage", None, lambda w: b"\x89PNG\r\n" + bytes(range(256)), "weights", NOT_SAFETENSORS),
    ("empty_weights", None, lambda w: b"", "weights", NOT_SAFETENSORS),
]
# fmt: on


@pytest.mark.parametrize(
    ("config", "cut", "param", "message"),
    [case[1:] for case in BAD_BYTES],
    ids=[case[0] for case in BAD_BYTES],
)
def test_bad_file_bytes(
    saved: dict[str, Saved], config: bytes | None, cut: Any, param: str, message: str
) -> None:
    good_config, weights = saved["prefix"].files
    with pytest.raises(AdapterError) as info:
        config = good_config if config is None else config
        parse_adapter(config, cut(weights) if cut else weights, SHAPE)
    assert info.value.param == param
    assert message in str(info.value)


@pytest.mark.parametrize(("name", "width"), [("prompt", 65), ("p_tuning", 63)])
def test_prompt_hidden_size_mismatch(saved: dict[str, Saved], name: str, width: int) -> None:
    config = saved[name].files[0]
    with pytest.raises(AdapterError) as info:
        parse_adapter(config, st({"prompt_embeddings": torch.randn(P, width)}), SHAPE)
    assert info.value.param == "weights"
    kind = {"prompt": "prompt_tuning", "p_tuning": "p_tuning"}[name]
    assert str(info.value) == (
        f"{kind} weights have shape [5, {width}]; the base model needs [5, 64] (hidden size 64)"
    )
    with pytest.raises(AdapterError) as info:
        parse_adapter(cfg(saved[name].config, token_dim=width), saved[name].files[1], SHAPE)
    assert info.value.param == "token_dim"
    assert f"token_dim={width}; the base model needs 64" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "param", "message"),
    [
        ({"num_key_value_heads": 4}, "num_attention_heads", "num_attention_heads=4"),
        ({"num_hidden_layers": 3}, "num_layers", "num_layers=3; the base model needs 2"),
    ],
)
def test_adapter_made_for_another_model(
    tmp_path: Path, overrides: dict, param: str, message: str
) -> None:
    peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    other = save_adapter(tmp_path / "other", peft_config, **overrides)
    with pytest.raises(AdapterError) as info:
        parse_adapter(*other.files, SHAPE)
    assert info.value.param == param
    assert message in str(info.value)


def test_oversize_bytes(saved: dict[str, Saved]) -> None:
    config, weights = saved["prefix"].files
    with pytest.raises(AdapterTooLargeError) as info:
        parse_adapter(config, weights, SHAPE, AdapterLimits(max_file_bytes=100))
    assert info.value.param == "weights"
    assert str(info.value) == (
        f"adapter_model.safetensors is {len(weights)} bytes; the limit is 100 bytes"
    )
    with pytest.raises(AdapterTooLargeError) as info:
        parse_adapter(config, weights, SHAPE, AdapterLimits(max_config_bytes=10))
    assert info.value.param == "config"
    assert str(info.value) == f"adapter_config.json is {len(config)} bytes; the limit is 10 bytes"


# --- reading a PEFT directory --------------------------------------------------------------------


def test_read_peft_dir_returns_exactly_the_two_files(saved: dict[str, Saved]) -> None:
    assert (saved["prefix"].dir / "README.md").exists()  # written by PEFT, ignored
    assert read_peft_dir(saved["prefix"].dir) == saved["prefix"].files
    assert read_peft_dir(str(saved["prefix"].dir)) == saved["prefix"].files


@pytest.mark.parametrize(
    ("setup", "param", "message"),
    [
        ("no_config", "config", "adapter_config.json not found in the adapter directory"),
        ("no_weights", "weights", "pickled adapter_model.bin files are not accepted"),
        ("link_config", "config", "adapter_config.json is a symbolic link; expected a regular"),
        ("link_weights", "weights", "adapter_model.safetensors is a symbolic link"),
        ("fifo_config", "config", "adapter_config.json is not a regular file"),
        ("dir_weights", "weights", "adapter_model.safetensors is not a regular file"),
        ("not_a_dir", "config", "is not a directory; expected the directory that"),
        ("big_weights", "weights", "adapter_model.safetensors is {weights} bytes; the limit is 2"),
        ("big_config", "config", "adapter_config.json is {config} bytes; the limit is 10 bytes"),
    ],
)
def test_read_peft_dir_refuses(
    saved: dict[str, Saved], tmp_path: Path, setup: str, param: str, message: str
) -> None:
    d = tmp_path / "adapter"
    shutil.copytree(saved["prefix"].dir, d)
    config, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    limits = AdapterLimits()
    if setup.startswith("no_"):
        (config if setup == "no_config" else weights).unlink()
    elif setup.startswith("link_"):
        target = config if setup == "link_config" else weights
        target.rename(tmp_path / "real")
        target.symlink_to(tmp_path / "real")
    elif setup == "fifo_config":
        config.unlink()
        os.mkfifo(config)
    elif setup == "dir_weights":
        weights.unlink()
        weights.mkdir()
    elif setup == "not_a_dir":
        d = weights
    elif setup == "big_weights":
        limits = AdapterLimits(max_file_bytes=2000)
    elif setup == "big_config":
        limits = AdapterLimits(max_config_bytes=10)
    sizes = {"config": len(saved["prefix"].files[0]), "weights": len(saved["prefix"].files[1])}
    with pytest.raises(AdapterError) as info:
        read_peft_dir(d, limits)
    assert info.value.param == param
    assert message.format(**sizes) in str(info.value)
    assert isinstance(info.value, AdapterTooLargeError) == setup.startswith("big_")


# --- text prefixes -------------------------------------------------------------------------------


def test_text_adapter() -> None:
    adapter = text_adapter("You are a pirate.")
    assert adapter.kind == "text" and adapter.num_virtual_tokens == 0
    assert adapter.text == "You are a pirate."
    assert adapter.kv is None and adapter.embeddings is None and adapter.peft_config is None
    expected = hashlib.sha256(b"prefix-serve/adapter/v1\0text\0You are a pirate.").hexdigest()
    assert adapter.sha256 == expected
    assert text_adapter("You are a pirate.").sha256 == expected
    assert text_adapter("You are a pirate!").sha256 != expected


@pytest.mark.parametrize(
    ("text", "limits", "error", "message"),
    [
        ("", AdapterLimits(), AdapterError, "text is empty; expected at least one character"),
        ("x" * 11, AdapterLimits(max_text_chars=10), AdapterTooLargeError, "is 11 characters"),
        ("x" * 100_001, AdapterLimits(), AdapterTooLargeError, "the limit is 100000"),
        ("ok\ud800", AdapterLimits(), AdapterError, "unpaired surrogate at character 2"),
        (b"bytes", AdapterLimits(), AdapterError, "text must be a string, got bytes"),
    ],
)
def test_bad_text(text: Any, limits: AdapterLimits, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        text_adapter(text, limits)
    assert info.value.param == "text"
    assert message in str(info.value)
