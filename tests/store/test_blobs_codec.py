"""Blob files (atomic writes, collection) and the blob format (round trip, corruption)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from store_helpers import make_adapter, same_content

from adapters_store.blobs import LocalBlobStore, open_blobs
from adapters_store.codec import decode, encode
from adapters_store.types import BlobError

KINDS = ["prefix_tuning", "prompt_tuning", "p_tuning", "text"]
SHA = "ab" * 32


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_keeps_content_hash_and_config(kind: str) -> None:
    adapter = make_adapter(kind, seed=7)
    back = decode(encode(adapter), adapter.sha256)
    assert same_content(back, adapter)
    assert back.num_virtual_tokens == adapter.num_virtual_tokens
    assert back.peft_config == adapter.peft_config


@pytest.mark.parametrize("kind", KINDS)
def test_any_flipped_byte_in_the_content_is_an_error(kind: str) -> None:
    adapter = make_adapter(kind, seed=7)
    data = bytearray(encode(adapter))
    data[-1] ^= 0x01  # the last byte of the tensor data
    with pytest.raises(BlobError, match="hashes to"):
        decode(bytes(data), adapter.sha256)


def test_bad_header_wrong_name_and_truncation_are_errors() -> None:
    adapter = make_adapter("prefix_tuning", seed=1)
    data = encode(adapter)
    with pytest.raises(BlobError, match="bad header"):
        decode(b"\xff" * 8 + data[8:], adapter.sha256)
    with pytest.raises(BlobError, match="names another adapter"):
        decode(data, "0" * 64)
    with pytest.raises(BlobError, match="corrupt"):
        decode(data[:-4], adapter.sha256)
    with pytest.raises(BlobError, match="not a prefix-serve-adapter/1 blob"):
        decode(data.replace(b"prefix-serve-adapter/1", b"prefix-serve-adapter/9"), adapter.sha256)


def test_write_is_atomic_and_read_back(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    blobs.write(SHA, b"hello")
    assert blobs.read(SHA) == b"hello"
    assert blobs.path(SHA) == tmp_path / "objects" / "ab" / f"{SHA}.safetensors"
    assert list(blobs.tmp.iterdir()) == []
    blobs.write(SHA, b"hello")  # rewriting identical content is harmless
    assert [sha for sha, _ in blobs.scan()] == [SHA]
    with pytest.raises(BlobError, match="missing"):
        blobs.read("cd" * 32)
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


def test_collect_puts_back_a_blob_that_became_referenced(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    blobs.write(SHA, b"x")
    assert blobs.collect(SHA, unreferenced=lambda: False) is False
    assert blobs.read(SHA) == b"x" and list(blobs.trash.iterdir()) == []
    assert blobs.collect(SHA, unreferenced=lambda: True) is True
    assert not blobs.exists(SHA) and list(blobs.trash.iterdir()) == []


def test_clean_removes_old_leftovers_only(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    old, young = blobs.tmp / f"{SHA}.1.part", blobs.tmp / f"{SHA}.2.part"
    old.write_bytes(b"half")
    young.write_bytes(b"half")
    os.utime(old, (time.time() - 1000, time.time() - 1000))
    # A collector that crashed after moving blobs to trash: one still referenced, one not.
    kept, dropped = "cd" * 32, "ef" * 32
    stamp = time.time_ns() - 10**12
    (blobs.trash / f"{kept}.{stamp}.aa").write_bytes(b"k")
    (blobs.trash / f"{dropped}.{stamp}.bb").write_bytes(b"d")
    assert blobs.clean(time.time() - 100, referenced=lambda sha: sha == kept) == 2
    assert sorted(p.name for p in blobs.tmp.iterdir()) == [young.name]
    assert blobs.read(kept) == b"k" and not blobs.exists(dropped)
    assert list(blobs.trash.iterdir()) == []


def test_blob_urls(tmp_path: Path) -> None:
    assert open_blobs(tmp_path).root == tmp_path / "blobs"
    assert open_blobs(tmp_path, f"file://{tmp_path}/shared").root == tmp_path / "shared"
    for url in ("http://example.com/x", "file://host/x", f"file://{tmp_path}?x=1"):
        with pytest.raises(ValueError, match="expected file:///absolute/path or s3://bucket/"):
            open_blobs(tmp_path, url)
    # s3:// URLs: tests/store/test_s3.py
