"""CanonicalAdapter <-> blob bytes (a safetensors file).

One tensor per blob: ``kv`` (prefix tuning, [L, 2, H_kv, P, D]), ``embeddings`` (prompt and
P-tuning, [P, hidden]) or ``text_utf8`` (text prefixes, uint8). The safetensors metadata holds
the kind, the virtual-token count, the content sha256 and the PEFT config (JSON) kept beside
the tensor. Decoding trusts nothing: the content hash is recomputed and must equal the
registry's, so a blob that decodes is exactly what was validated at upload.
"""

from __future__ import annotations

import json
import struct
from typing import Any, TypeGuard

import safetensors.torch
import torch

from adapters_store.formats import CanonicalAdapter, _hash, _tensor_hash
from adapters_store.types import BlobError
from adapters_store.validate import TensorKind

FORMAT = "prefix-serve-adapter/1"
TENSOR_KEY = {"prefix_tuning": "kv", "prompt_tuning": "embeddings", "p_tuning": "embeddings"}
TEXT_KEY = "text_utf8"


def encode(adapter: CanonicalAdapter) -> bytes:
    metadata = {
        "format": FORMAT,
        "kind": adapter.kind,
        "num_virtual_tokens": str(adapter.num_virtual_tokens),
        "sha256": adapter.sha256,
    }
    if adapter.peft_config is not None:
        metadata["peft_config"] = json.dumps(adapter.peft_config, sort_keys=True)
    if adapter.kind == "text":
        assert adapter.text is not None
        raw = bytearray(adapter.text.encode("utf-8"))
        tensors = {TEXT_KEY: torch.frombuffer(raw, dtype=torch.uint8)}
    else:
        tensor = adapter.kv if adapter.kind == "prefix_tuning" else adapter.embeddings
        assert tensor is not None and tensor.dtype == torch.float32
        tensors = {TENSOR_KEY[adapter.kind]: tensor.contiguous()}
    return safetensors.torch.save(tensors, metadata)


def decode(data: bytes, sha256: str) -> CanonicalAdapter:
    """The adapter in blob ``data``, whose content hash must be ``sha256``; BlobError if the
    blob is unreadable, inconsistent or hashes to anything else."""
    metadata = _metadata(data, sha256)
    kind = metadata.get("kind")
    try:
        tensors = safetensors.torch.load(data)
        num_virtual_tokens = int(metadata.get("num_virtual_tokens", ""))
        peft_config = json.loads(metadata["peft_config"]) if "peft_config" in metadata else None
    except Exception as exc:  # SafetensorError, ValueError, JSONDecodeError
        raise BlobError(f"blob {sha256} is corrupt ({exc})") from None
    if kind == "text":
        raw = tensors.get(TEXT_KEY)
        if set(tensors) != {TEXT_KEY} or raw is None or raw.dtype != torch.uint8:
            raise BlobError(f"blob {sha256} is corrupt (expected one uint8 tensor {TEXT_KEY!r})")
        encoded = raw.numpy().tobytes()
        _check_hash(sha256, _hash("text", encoded))
        return CanonicalAdapter(
            kind="text", num_virtual_tokens=0, sha256=sha256, text=encoded.decode("utf-8")
        )
    tensor = tensors.get(TENSOR_KEY[kind]) if _is_tensor_kind(kind) else None
    if (
        not _is_tensor_kind(kind)
        or tensor is None
        or len(tensors) != 1
        or tensor.dtype != torch.float32
    ):
        raise BlobError(f"blob {sha256} is corrupt (kind {kind!r} with tensors {sorted(tensors)})")
    _check_hash(sha256, _tensor_hash(kind, tensor))
    rows = tensor.shape[3] if kind == "prefix_tuning" else tensor.shape[0]
    if rows != num_virtual_tokens:
        raise BlobError(f"blob {sha256} is corrupt (num_virtual_tokens disagrees with the data)")
    return CanonicalAdapter(
        kind=kind,
        num_virtual_tokens=num_virtual_tokens,
        sha256=sha256,
        kv=tensor if kind == "prefix_tuning" else None,
        embeddings=None if kind == "prefix_tuning" else tensor,
        peft_config=peft_config,
    )


def adapter_nbytes(adapter: CanonicalAdapter) -> int:
    """Bytes the adapter's content takes in memory (what the host tier counts)."""
    if adapter.kind == "text":
        return len(adapter.text or "") * 4  # upper bound of a str's footprint per character
    tensor = adapter.kv if adapter.kv is not None else adapter.embeddings
    assert tensor is not None
    return tensor.nbytes


def _metadata(data: bytes, sha256: str) -> dict[str, Any]:
    # safetensors.torch.load does not return the metadata; the header is 8 bytes of
    # little-endian length, then that much JSON.
    try:
        (length,) = struct.unpack_from("<Q", data)
        header = json.loads(data[8 : 8 + length])
        metadata = header["__metadata__"]
    except Exception as exc:
        raise BlobError(f"blob {sha256} is corrupt (bad header: {exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise BlobError(f"blob {sha256} is not a {FORMAT} blob")
    if metadata.get("sha256") != sha256:
        raise BlobError(f"blob {sha256} is corrupt (its header names another adapter)")
    return metadata


def _is_tensor_kind(kind: object) -> TypeGuard[TensorKind]:
    return isinstance(kind, str) and kind in TENSOR_KEY


def _check_hash(expected: str, actual: str) -> None:
    if actual != expected:
        raise BlobError(f"blob {expected} is corrupt (its content hashes to {actual})")
