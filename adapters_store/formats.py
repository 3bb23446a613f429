"""PEFT adapter files (or a text prefix) -> one canonical, validated adapter.

Only `adapter_config.json` and `adapter_model.safetensors` are ever read; never pickle, never
`torch.load`, never PEFT's own loader. The checks live in `validate.py`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import Any, Literal

import torch

from adapters_store.validate import (
    AdapterError,
    AdapterLimits,
    AdapterTooLargeError,
    ModelShape,
    check_config,
    check_size,
    check_text,
    check_weights,
    load_weights,
    parse_config,
)

__all__ = [
    "AdapterError",
    "AdapterKind",
    "AdapterLimits",
    "AdapterTooLargeError",
    "CanonicalAdapter",
    "ModelShape",
    "parse_adapter",
    "read_peft_dir",
    "text_adapter",
]

AdapterKind = Literal["prefix_tuning", "prompt_tuning", "p_tuning", "text"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_HASH_DOMAIN = b"prefix-serve/adapter/v1\0"
DEFAULT_LIMITS = AdapterLimits()  # frozen, so safe to share as a default


@dataclass(frozen=True, eq=False)
class CanonicalAdapter:
    """A validated adapter in the one form the rest of the server uses.

    Exactly one of `kv`, `embeddings`, `text` is set, by kind:
    - prefix_tuning: `kv` float32 [L, 2, H_kv, P, D], contiguous; `kv[l, 0]` is layer l's key,
      `kv[l, 1]` its value, for virtual positions 0..P-1 (no RoPE applied, as PEFT stores it);
    - prompt_tuning / p_tuning: `embeddings` float32 [P, hidden], contiguous, fed to the frozen
      model at positions 0..P-1;
    - text: `text`; `num_virtual_tokens` is 0 until the caller tokenizes it.
    `sha256` covers the kind and the canonical content only (not the config), so equal content
    from differently encoded files (e.g. float16 vs float32 of the same values) hashes the same.
    """

    kind: AdapterKind
    num_virtual_tokens: int
    sha256: str
    kv: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    text: str | None = None
    peft_config: dict[str, Any] | None = None


def read_peft_dir(
    path: str | os.PathLike[str], limits: AdapterLimits = DEFAULT_LIMITS
) -> tuple[bytes, bytes]:
    """Read (adapter_config.json, adapter_model.safetensors) bytes from a PEFT output directory.

    Only those two files are opened; each must be a regular file, not a symbolic link, and
    within its size limit (checked before the file is read whole).
    """
    if not os.path.isdir(path):
        raise AdapterError(
            f"{os.fspath(path)!r} is not a directory; expected the directory that "
            "PeftModel.save_pretrained wrote",
            param="config",
        )
    config = _read_file(os.path.join(path, CONFIG_NAME), limits.max_config_bytes, "config")
    weights = _read_file(os.path.join(path, WEIGHTS_NAME), limits.max_file_bytes, "weights")
    return config, weights


def _read_file(path: str, limit: int, param: str) -> bytes:
    name = os.path.basename(path)
    # O_NOFOLLOW refuses a symlink at open time (no check-then-open race); O_NONBLOCK keeps a
    # FIFO planted under the name from blocking the open.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        hint = " (pickled adapter_model.bin files are not accepted)" if param == "weights" else ""
        raise AdapterError(
            f"{name} not found in the adapter directory; expected the files that "
            f"PeftModel.save_pretrained writes{hint}",
            param=param,
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AdapterError(
                f"{name} is a symbolic link; expected a regular file", param=param
            ) from None
        raise AdapterError(f"cannot open {name}: {exc.strerror}", param=param) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterError(f"{name} is not a regular file", param=param)
        check_size(info.st_size, limit, name, param)
        with os.fdopen(fd, "rb", closefd=False) as f:
            # A buffered read(n) allocates n bytes up front: ask for the size fstat gave, and
            # one more byte to notice a file that grew since.
            data = f.read(info.st_size + 1)
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise AdapterError(f"{name} changed while it was read; try again", param=param)
    return data


def parse_adapter(
    config_bytes: bytes,
    weights_bytes: bytes,
    shape: ModelShape,
    limits: AdapterLimits = DEFAULT_LIMITS,
) -> CanonicalAdapter:
    """Validate PEFT adapter files against the base model's shape and canonicalize them.

    Raises `AdapterError` (or `AdapterTooLargeError`) for any bad input; nothing is trusted.
    """
    config = parse_config(config_bytes, limits)
    kind, num_virtual_tokens = check_config(config, shape, limits)
    tensor = load_weights(weights_bytes, kind, limits)
    check_weights(tensor, kind, num_virtual_tokens, shape)
    if kind == "prefix_tuning":
        kv = prefix_kv(tensor, shape)
        return CanonicalAdapter(
            kind=kind,
            num_virtual_tokens=num_virtual_tokens,
            sha256=_tensor_hash(kind, kv),
            kv=kv,
            peft_config=config,
        )
    return CanonicalAdapter(
        kind=kind,
        num_virtual_tokens=num_virtual_tokens,
        sha256=_tensor_hash(kind, tensor),
        embeddings=tensor,
        peft_config=config,
    )


def prefix_kv(embeddings: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """PEFT's prefix-tuning layout [P, L*2*H_kv*D] -> [L, 2, H_kv, P, D] (contiguous).

    Same as PeftModel.get_prompt: view [P, L*2, H_kv, D], permute to [L*2, H_kv, P, D]; row 2l
    is layer l's key, row 2l+1 its value.
    """
    p = embeddings.shape[0]
    kv = embeddings.view(p, shape.num_layers * 2, shape.num_kv_heads, shape.head_dim)
    kv = kv.permute(1, 2, 0, 3).contiguous()
    return kv.view(shape.num_layers, 2, shape.num_kv_heads, p, shape.head_dim)


def text_adapter(text: str, limits: AdapterLimits = DEFAULT_LIMITS) -> CanonicalAdapter:
    """A text prefix (system prompt, few-shot block); the caller tokenizes it."""
    encoded = check_text(text, limits)
    return CanonicalAdapter(
        kind="text", num_virtual_tokens=0, sha256=_hash("text", encoded), text=text
    )


def _tensor_hash(kind: str, tensor: torch.Tensor) -> str:
    assert tensor.dtype == torch.float32 and tensor.is_contiguous()
    # Shape is hashed too: the same bytes under another shape are different KV.
    header = ("x".join(str(n) for n in tensor.shape) + "\0float32le\0").encode()
    data = tensor.numpy().astype("<f4", copy=False)
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; it is a buffer on 3.11 too.
    return _hash(kind, header, memoryview(data))  # type: ignore[arg-type]


def _hash(kind: str, *parts: bytes | memoryview) -> str:
    h = hashlib.sha256(_HASH_DOMAIN + kind.encode() + b"\0")
    for part in parts:
        h.update(part)
    return h.hexdigest()
