"""Small adapters for the adapter store tests, made through the real parser."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from safetensors.torch import save as st_save

from adapters_store.formats import CanonicalAdapter, ModelShape, parse_adapter, text_adapter
from adapters_store.store import AdapterStore

StoreFactory = Callable[..., AdapterStore]  # the make_store fixture: (data_dir=None, **options)
SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=4, hidden_size=16, vocab_size=64)


def prefix_adapter(seed: int, num_virtual_tokens: int = 3) -> CanonicalAdapter:
    """A prefix-tuning adapter as PEFT would save it, parsed by the real parser."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_virtual_tokens, SHAPE.prefix_width, generator=g)
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "num_layers": SHAPE.num_layers,
        "num_attention_heads": SHAPE.num_kv_heads,
        "token_dim": SHAPE.num_kv_heads * SHAPE.head_dim,
    }
    return parse_adapter(
        json.dumps(config).encode(), st_save({"prompt_embeddings": weights}), SHAPE
    )


def prompt_adapter(seed: int, num_virtual_tokens: int = 3, peft_type: str = "PROMPT_TUNING"):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_virtual_tokens, SHAPE.hidden_size, generator=g)
    config = {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": SHAPE.hidden_size,
    }
    return parse_adapter(
        json.dumps(config).encode(), st_save({"prompt_embeddings": weights}), SHAPE
    )


def make_adapter(kind: str, seed: int) -> CanonicalAdapter:
    if kind == "prefix_tuning":
        return prefix_adapter(seed)
    if kind == "prompt_tuning":
        return prompt_adapter(seed)
    if kind == "p_tuning":
        return prompt_adapter(seed, peft_type="P_TUNING")
    return text_adapter(f"You are assistant number {seed}.")


def same_content(a: CanonicalAdapter, b: CanonicalAdapter) -> bool:
    if a.kind != b.kind or a.sha256 != b.sha256 or a.text != b.text:
        return False
    for x, y in ((a.kv, b.kv), (a.embeddings, b.embeddings)):
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.005)
    return time.monotonic() - start


def corrupt_blob(store: AdapterStore, sha: str) -> None:
    """Flip one byte of blob ``sha`` where it is stored: the file, or the S3 object (keeping
    its recorded digest) and this replica's cached copy of it."""
    from adapters_store.blobs import LocalBlobStore

    def flip(data: bytes) -> bytes:
        damaged = bytearray(data)
        damaged[-3] ^= 0x40
        return bytes(damaged)

    blobs = store.blobs
    if isinstance(blobs, LocalBlobStore):
        path = blobs.path(sha)
        path.write_bytes(flip(path.read_bytes()))
        return
    from adapters_store.s3_blobs import S3BlobStore

    assert isinstance(blobs, S3BlobStore)
    key = blobs.key(sha)
    stored = blobs.client.get_object(Bucket=blobs.bucket, Key=key)
    blobs.client.put_object(
        Bucket=blobs.bucket, Key=key, Body=flip(stored["Body"].read()), Metadata=stored["Metadata"]
    )
    (copy,) = blobs.cache.root.glob(f"{sha}.*")
    copy.write_bytes(flip(copy.read_bytes()))
