"""The header of an untrusted ``adapter_model.safetensors``, checked before any tensor is
decoded, so that every malformed file gets a message naming what is wrong with it.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the tensor data; offsets count from the start of the data. ``read_header`` enforces what
``safetensors`` itself enforces when loading (every tensor's bytes match its shape and dtype,
tensors neither overlap nor leave gaps, the data ends with the last tensor), plus a cap on the
header's size: PEFT writes a header of a few hundred bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, NoReturn

MAX_HEADER_BYTES = 1 << 20
# safetensors dtype -> (bits per element, the torch name used in messages).
DTYPES = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "F4": (4, "float4_e2m1fn"),
    "F6_E2M3": (6, "float6_e2m3fn"),
    "F6_E3M2": (6, "float6_e3m2fn"),
    "U16": (16, "uint16"),
    "I16": (16, "int16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "U32": (32, "uint32"),
    "I32": (32, "int32"),
    "F32": (32, "float32"),
    "U64": (64, "uint64"),
    "I64": (64, "int64"),
    "F64": (64, "float64"),
    "C64": (64, "complex64"),
}


class HeaderError(ValueError):
    """A malformed safetensors file; ``str()`` says what is wrong, without naming the file.
    ``too_large``: the header is over ``MAX_HEADER_BYTES`` (a size limit, not a defect)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; ``begin``/``end`` are byte offsets into the data
    section (already checked to lie inside it and to match ``shape`` and ``dtype``)."""

    name: str
    dtype: str  # the safetensors name, a key of DTYPES
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype_name(self) -> str:
        return DTYPES[self.dtype][1]


def read_header(data: bytes) -> dict[str, TensorEntry]:
    """The tensors ``data`` (a whole safetensors file) declares, by name, after checking the
    header's structure and every tensor's extent; raises ``HeaderError``."""
    if len(data) < 8:
        _fail(
            f"{len(data)} bytes is too short (a safetensors file starts with an 8-byte header "
            f"length, then a JSON header){_looks_like(data)}"
        )
    (size,) = struct.unpack_from("<Q", data)
    if size > len(data) - 8:
        _fail(
            f"it declares a {size}-byte header but only {len(data) - 8} bytes follow the "
            f"length field (truncated, or another kind of file){_looks_like(data)}"
        )
    if size > MAX_HEADER_BYTES:
        raise HeaderError(
            f"its header is {size} bytes; the limit is {MAX_HEADER_BYTES} bytes (PEFT writes "
            "a few hundred)",
            too_large=True,
        )
    header = _parse_json(data[8 : 8 + size], data)
    data_bytes = len(data) - 8 - size
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(v, str) for v in metadata.values())  # keys: JSON makes them str
    ):
        _fail(f"the header's __metadata__ is {_show(metadata)}; expected strings by name")
    entries = {name: _entry(name, value, data_bytes) for name, value in header.items()}
    _check_layout(sorted(entries.values(), key=lambda e: (e.begin, e.end)), data_bytes)
    return entries


def _parse_json(raw: bytes, data: bytes) -> dict[str, Any]:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                _fail(f"the header names {_show(key)} twice")
            out[key] = value
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except HeaderError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError
        _fail(f"the header is not valid JSON ({_cut(str(exc))}){_looks_like(data)}")
    if not isinstance(header, dict):
        _fail(f"the header is a JSON {type(header).__name__}; expected an object")
    return header


def _entry(name: str, value: Any, data_bytes: int) -> TensorEntry:
    where = f"tensor {_show(name)}"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        _fail(f"{where} is {_show(value)}; expected an object of dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        _fail(f"{where} has unknown dtype {_show(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        _fail(f"{where} has shape {_show(shape)}; expected a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(n) for n in offsets)
        or offsets[0] > offsets[1]
    ):
        _fail(f"{where} has data_offsets {_show(offsets)}; expected [begin, end], begin <= end")
    begin, end = offsets
    if end > data_bytes:
        _fail(
            f"{where} has data_offsets {_show(offsets)}, outside the {data_bytes} bytes of "
            "tensor data (the file is truncated or its header is wrong)"
        )
    bits = _bits(shape, DTYPES[dtype][0], most=data_bytes * 8)
    if bits != (end - begin) * 8:
        size = f"more than all {data_bytes} bytes of data" if bits is None else _bytes(bits)
        _fail(
            f"{where} has shape {_show(shape)} of {dtype} ({size}) but data_offsets "
            f"[{begin}, {end}] hold {end - begin} bytes"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _bits(shape: list[int], element_bits: int, most: int) -> int | None:
    """The bits a tensor of ``shape`` holds, or None if over ``most``: hostile dimensions of
    thousands of digits each never multiply into a huge integer."""
    if 0 in shape:
        return 0
    bits = element_bits
    for n in shape:
        bits *= n
        if bits > most:
            return None
    return bits


def _check_layout(entries: list[TensorEntry], data_bytes: int) -> None:
    """Sorted by offset, the tensors must tile the data section exactly."""
    at, previous = 0, None
    for entry in entries:
        if entry.begin < at:
            assert previous is not None  # offsets are non-negative: at > 0 only after an entry
            _fail(
                f"tensors {_show(previous.name)} and {_show(entry.name)} overlap (bytes "
                f"[{previous.begin}, {previous.end}] and [{entry.begin}, {entry.end}])"
            )
        if entry.begin > at:
            _fail(f"{entry.begin - at} unused bytes lie before tensor {_show(entry.name)}")
        at, previous = entry.end, entry
    if at != data_bytes:
        _fail(f"{data_bytes - at} bytes of data follow the last tensor")


def _looks_like(data: bytes) -> str:
    """A hint for a file that is something else than safetensors (to append to a message)."""
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return (
            " (it looks like a Python pickle, such as a PEFT adapter_model.bin: pickles are "
            "never loaded; save with safe_serialization=True)"
        )
    if data[:4] == b"PK\x03\x04":
        return (
            " (it is a zip file: torch.save's format, whose pickles are never loaded, or an "
            "archive, which is uploaded as 'archive')"
        )
    if data[:2] == b"\x1f\x8b":
        return " (it is gzip-compressed: a .tar.gz is uploaded as 'archive')"
    if data[:1] == b"{":
        return " (it looks like JSON: is it adapter_config.json?)"
    return ""


def _fail(message: str) -> NoReturn:
    raise HeaderError(message)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bytes(bits: int) -> str:
    return f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits"


def _cut(text: str, most: int = 120) -> str:
    return text if len(text) <= most else text[:most] + "..."


def _show(value: Any, most: int = 60) -> str:
    return _cut(repr(value), most)
