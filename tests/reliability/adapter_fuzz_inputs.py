"""Hostile adapter files for ``test_adapter_fuzz.py``, built byte by byte where the standard
writers refuse to produce them: safetensors files with any header, zip and tar archives with
any entry, and decompression bombs built in constant time (a MiB of zeros is deflated once,
after a full flush, and its compressed bytes repeated)."""

from __future__ import annotations

import json
import struct
import tarfile
import zlib
from dataclasses import dataclass

import torch
from safetensors.torch import save

MIB = 1 << 20
ZERO_MIB = bytes(MIB)


def safetensors_raw(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (a dict, or raw bytes) and data; ``length``
    overrides the header length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensors_file(tensors: dict[str, torch.Tensor]) -> bytes:
    """What ``save_pretrained`` writes for these tensors (safetensors, format pt)."""
    return save(tensors, metadata={"format": "pt"})


def header_of(weights: bytes) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file."""
    (size,) = struct.unpack_from("<Q", weights)
    return json.loads(weights[8 : 8 + size]), weights[8 + size :]


@dataclass(frozen=True)
class Deflated:
    """A raw deflate stream and the CRC-32 and size of what it inflates to."""

    data: bytes
    crc: int
    size: int


def deflate(data: bytes) -> Deflated:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return Deflated(c.compress(data) + c.flush(), zlib.crc32(data), len(data))


def deflate_zeros(head: bytes, mib: int, tail: bytes = b"") -> Deflated:
    """``head``, ``mib`` MiB of zeros, ``tail``, deflated in time independent of ``mib``."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(ZERO_MIB) + c.flush(zlib.Z_FULL_FLUSH)  # no reference across a flush
    last = c.compress(tail) + c.flush()
    crc = zlib.crc32(head)
    for _ in range(mib):  # ~0.5 s a GiB
        crc = zlib.crc32(ZERO_MIB, crc)
    crc = zlib.crc32(tail, crc)
    return Deflated(first + block * mib + last, crc, len(head) + mib * MIB + len(tail))


def gzip_member(d: Deflated) -> bytes:
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + d.data + struct.pack("<II", d.crc, d.size & 0xFFFFFFFF)


@dataclass(frozen=True)
class ZipEntry:
    """One zip member. ``declared`` overrides the uncompressed size written in the headers
    (a lie); ``mode`` is the Unix mode (file type included); ``method`` 8 is deflate."""

    name: str
    body: Deflated
    method: int = 8
    declared: int | None = None
    mode: int = 0o100644
    flags: int = 0


def zip_raw(entries: list[ZipEntry]) -> bytes:
    """A zip file written field by field (duplicate names, lies and odd modes included)."""
    out, directory = bytearray(), bytearray()
    for e in entries:
        name = e.name.encode()
        size = e.body.size if e.declared is None else e.declared
        fields = struct.pack(
            "<HHHHHIII", 20, e.flags, e.method, 0, 0x21, e.body.crc, len(e.body.data), size
        )
        offset = len(out)
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name + e.body.data
        directory += (
            b"PK\x01\x02"
            + struct.pack("<H", 3 << 8 | 20)  # made on Unix: the mode is in external_attr
            + fields
            + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, e.mode << 16, offset)
            + name
        )
    end = struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(directory), len(out), 0)
    return bytes(out + directory + b"PK\x05\x06" + end)


def stored(data: bytes) -> Deflated:
    return Deflated(data, zlib.crc32(data), len(data))


def member(
    name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


Members = list[tuple[tarfile.TarInfo, bytes]]


def tar_members(members: Members, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """Tar headers and contents (sizes as the headers say), without the end-of-archive
    blocks."""
    out = bytearray()
    for info, content in members:
        out += info.tobuf(fmt) + content + bytes(-len(content) % 512)
    return bytes(out)


def tar_raw(members: Members, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    return tar_members(members, fmt) + bytes(1024)


def gzip_of(data: bytes) -> bytes:
    return gzip_member(deflate(data))


def tgz_bomb(before: Members, name: str, mib: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A .tar.gz whose member ``name`` (of type ``kind``) holds ``mib`` MiB of zeros, after
    ``before``."""
    head = tar_members(before) + member(name, mib * MIB, kind).tobuf(tarfile.GNU_FORMAT)
    return gzip_member(deflate_zeros(head, mib, bytes(1024)))
