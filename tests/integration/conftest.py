"""Shared fixtures: the real default model (converted once under ./data) and PEFT adapters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.peft_adapters import make_p_tuning, make_prefix_tuning, make_prompt_tuning
from bench.reference import Segment, adapter_segment
from server.model_loader import load_base_model, resolve_model_dir

DATA_DIR = Path(os.environ.get("PREFIX_SERVE_TEST_DATA_DIR", "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model_dir("default", DATA_DIR)[0]


@pytest.fixture(scope="session")
def ref_model(model_dir: Path):
    """A separate copy of the base model for references (PEFT, HF generate): the engine
    routes its own copy's attention through prefix-serve's function."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    return load_base_model(str(model_dir), DATA_DIR, "cpu", "float32").tokenizer


@pytest.fixture(scope="session")
def adapter_dirs(ref_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "prefix": make_prefix_tuning(ref_model, root / "prefix", num_virtual_tokens=20, seed=1),
        "prefix_proj": make_prefix_tuning(
            ref_model, root / "prefix_proj", num_virtual_tokens=12, seed=2, prefix_projection=True
        ),
        "prompt": make_prompt_tuning(ref_model, root / "prompt", num_virtual_tokens=10, seed=3),
        "ptuning": make_p_tuning(ref_model, root / "ptuning", num_virtual_tokens=8, seed=4),
    }


@pytest.fixture(scope="session")
def ref_segments(ref_model, adapter_dirs) -> dict[str, Segment]:
    """The hand reference's view of each adapter: PEFT's adapter math over its saved files."""
    return {kind: adapter_segment(ref_model, path) for kind, path in adapter_dirs.items()}
