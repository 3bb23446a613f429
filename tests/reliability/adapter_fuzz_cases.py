"""The cases of ``test_adapter_fuzz.py``: the valid PEFT files of the tiny model's three
prefix-adapter kinds (``Inputs``), hostile uploads built from them (``CASES``: id, expected
status, a substring of the expected message, request builder) and valid variants (``VALID``)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from adapter_fuzz_inputs import (
    MIB,
    Deflated,
    ZipEntry,
    deflate,
    deflate_zeros,
    gzip_member,
    gzip_of,
    header_of,
    member,
    safetensors_raw,
    stored,
    tar_raw,
    tensors_file,
    tgz_bomb,
    zip_raw,
)
from http_helpers import CONFIG, WEIGHTS, tar_gz_of, zip_of
from safetensors.torch import load

KINDS = {"prefix": "prefix_tuning", "prompt": "prompt_tuning", "ptuning": "p_tuning"}
ROWS = {"prefix": 8, "prompt": 5, "ptuning": 4}  # num_virtual_tokens of each seeded adapter
COLS = {"prefix": 2 * 2 * 2 * 16, "prompt": 64, "ptuning": 64}  # tiny model: L 2, kv 2, D 16
SEEDED = {"prefix": "persona", "prompt": "soft", "ptuning": "encoder"}
PE = "prompt_embeddings"
BOMB_MIB = 1024  # every bomb inflates to 1 GiB


@dataclass
class Inputs:
    """The valid PEFT files of each kind (by ``KINDS`` key), and pieces built from them."""

    configs: dict[str, bytes]
    weights: dict[str, bytes]

    def cfg(self, kind: str = "prefix", **changes: object) -> bytes:
        """The config with ``changes`` (a None value removes the field)."""
        config = json.loads(self.configs[kind]) | changes
        return json.dumps({k: v for k, v in config.items() if v is not None}).encode()

    def tensor(self, kind: str = "prefix") -> torch.Tensor:
        return load(self.weights[kind])[PE]

    def entries(self, kind: str = "prefix", top: str = "my-adapter/") -> dict[str, bytes]:
        """What archiving the directory save_pretrained wrote gives (README.md included)."""
        return {
            top + CONFIG: self.configs[kind],
            top + WEIGHTS: self.weights[kind],
            top + "README.md": b"# model card\n",
        }

    def members(self, kind: str = "prefix") -> list[tuple[tarfile.TarInfo, bytes]]:
        return [(member(n, len(d)), d) for n, d in self.entries(kind).items()]

    @cached_property
    def zeros(self) -> Deflated:
        """1 GiB of zeros, deflated (1 MiB)."""
        return deflate_zeros(b"", BOMB_MIB)


@dataclass(frozen=True)
class Req:
    """One upload: multipart ``files`` (field -> bytes or (filename, bytes, type); a list of
    pairs to repeat a field) plus the ``name`` field, or a raw body."""

    files: dict | list | None = None
    fields: dict | None = None
    content: bytes | None = None
    headers: dict | None = None


FILENAMES = {"config": CONFIG, "weights": WEIGHTS, "archive": "adapter.zip"}


def mp(i: Inputs, kind: str = "prefix", **parts: bytes) -> Req:
    """Config and weights of ``kind``, with ``parts`` replacing either."""
    return Req(files={"config": i.configs[kind], "weights": i.weights[kind]} | parts)


def st_prefix(i: Inputs, entry: dict | None = None, extra: dict | None = None, tail=b"") -> Req:
    """The prefix adapter's weights with a hand-written header: ``entry`` replaces fields of
    prompt_embeddings' entry, ``extra`` adds entries; ``tail`` is appended to the data."""
    header, data = header_of(i.weights["prefix"])
    header[PE] |= entry or {}
    return mp(i, weights=safetensors_raw(header | (extra or {}), data + tail))


def with_tensor(i: Inputs, tensor: torch.Tensor, kind: str = "prefix") -> Req:
    return mp(i, kind, weights=tensors_file({PE: tensor}))


def form_fields(fields: dict[str, str]) -> Req:
    """A multipart form of text fields only (httpx would send those url-encoded)."""
    body = b"".join(
        b'--b0undary\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (k.encode(), v.encode())
        for k, v in fields.items()
    )
    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    return Req(content=body + b"--b0undary--\r\n", headers=headers)


def arch(data: bytes) -> Req:
    return Req(files={"archive": data})


def zip_with(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def tgz_with(members: list[tuple[tarfile.TarInfo, bytes]], fmt=tarfile.GNU_FORMAT) -> bytes:
    return gzip_of(tar_raw(members, fmt))


def torch_saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def nan_at(t: torch.Tensor, value: float, row: int = 2, col: int = 7) -> torch.Tensor:
    t = t.clone()
    t[row, col] = value
    return t


def resized(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 1000 + cols))


def directory_offset_lie(zipped: bytes) -> bytes:
    """A zip whose end record puts its central directory 512 bytes later than it is (zipfile
    then shifts every member's offset below 0)."""
    end = zipped.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<I", zipped, end + 16)
    return zipped[: end + 16] + struct.pack("<I", offset + 512) + zipped[end + 20 :]


def crc_flipped(tgz: bytes) -> bytes:
    return tgz[:-8] + bytes([tgz[-8] ^ 0xFF]) + tgz[-7:]


# fmt: off
def _cases() -> list[tuple[str, int, str, Callable[[Inputs], Req]]]:
    """(id, status, message substring, request builder)."""
    nvt = "num_virtual_tokens={} but prompt_embeddings has {} rows"
    bad_st = "adapter_model.safetensors is not a valid safetensors file: "
    cases: list[tuple[str, int, str, Callable[[Inputs], Req]]] = [
        # -- the safetensors container
        ("st-empty", 400, bad_st + "0 bytes is too short", lambda i: mp(i, weights=b"")),
        ("st-5-bytes", 400, "5 bytes is too short", lambda i: mp(i, weights=b"\x10\0\0\0\0")),
        ("st-truncated-header", 400, "byte header but only 60 bytes follow",
         lambda i: mp(i, weights=i.weights["prefix"][:68])),
        ("st-truncated-data", 400, "outside the 4095 bytes of tensor data",
         lambda i: mp(i, weights=i.weights["prefix"][:-1])),
        ("st-length-past-eof", 400, "bytes follow the length field",
         lambda i: mp(i, weights=safetensors_raw(*header_of(i.weights["prefix"]), 4300))),
        ("st-length-2**64-1", 400, "it declares a 18446744073709551615-byte header",
         lambda i: mp(i, weights=safetensors_raw(*header_of(i.weights["prefix"]), 2**64 - 1))),
        ("st-header-2MiB", 413, "its header is 2097152 bytes; the limit is 1048576 bytes",
         lambda i: mp(i, weights=safetensors_raw(
             json.dumps(header_of(i.weights["prefix"])[0]).encode().ljust(2 * MIB),
             header_of(i.weights["prefix"])[1]))),
        ("st-header-not-json", 400, bad_st + "the header is not valid JSON",
         lambda i: mp(i, weights=safetensors_raw(b"hello, world", bytes(4096)))),
        ("st-header-not-utf8", 400, "the header is not valid JSON",
         lambda i: mp(i, weights=safetensors_raw(b'{"\xff\xfe": 1}', b""))),
        ("st-header-list", 400, "the header is a JSON list; expected an object",
         lambda i: mp(i, weights=safetensors_raw(b"[]", b""))),
        ("st-header-deep", 400, "the header is not valid JSON",
         lambda i: mp(i, weights=safetensors_raw(b"[" * 100_000, b""))),
        ("st-entry-not-object", 400, "tensor 'prompt_embeddings' is 5; expected an object",
         lambda i: mp(i, weights=safetensors_raw({PE: 5}, b""))),
        ("st-entry-no-offsets", 400, "expected an object of dtype, shape and data_offsets",
         lambda i: mp(i, weights=safetensors_raw({PE: {"dtype": "F32", "shape": [8, 128]}}, b""))),
        ("st-dtype-unknown", 400, "tensor 'prompt_embeddings' has unknown dtype 'F128'",
         lambda i: st_prefix(i, {"dtype": "F128"})),
        ("st-shape-negative", 400, "has shape [-8, 128]; expected a list of non-negative",
         lambda i: st_prefix(i, {"shape": [-8, 128]})),
        ("st-shape-string", 400, "has shape '8x128'", lambda i: st_prefix(i, {"shape": "8x128"})),
        ("st-shape-overflow", 400, "has shape [4611686018427387904, 4611686018427387904] of "
         "F32 (more than all 4096 bytes of data) but data_offsets [0, 4096] hold 4096 bytes",
         lambda i: st_prefix(i, {"shape": [2**62, 2**62]})),
        ("st-shape-4000-digit-dims", 400, "of F32 (more than all 4096 bytes of data)",
         lambda i: st_prefix(i, {"shape": [10**4000 - 1] * 250})),
        ("st-offsets-4000-digits", 400, "has data_offsets [0, 99999999999999999999999999999",
         lambda i: st_prefix(i, {"data_offsets": [0, 10**4000 - 1]})),
        ("st-offsets-reversed", 400, "has data_offsets [4096, 0]; expected [begin, end]",
         lambda i: st_prefix(i, {"data_offsets": [4096, 0]})),
        ("st-offsets-outside", 400, "data_offsets [0, 4100], outside the 4096 bytes",
         lambda i: st_prefix(i, {"data_offsets": [0, 4100]})),
        ("st-offsets-vs-shape", 400, "has shape [8, 128] of F32 (4096 bytes) but data_offsets "
         "[0, 4092] hold 4092 bytes", lambda i: st_prefix(i, {"data_offsets": [0, 4092]})),
        ("st-offsets-overlap", 400,
         "tensors 'prompt_embeddings' and 'zz' overlap (bytes [0, 4096] and [4080, 4096])",
         lambda i: st_prefix(i, extra={"zz": {"dtype": "F32", "shape": [4],
                                               "data_offsets": [4080, 4096]}})),
        ("st-offsets-gap", 400, "16 unused bytes lie before tensor 'prompt_embeddings'",
         lambda i: st_prefix(i, {"data_offsets": [16, 4112]}, tail=bytes(16))),
        ("st-trailing-data", 400, "16 bytes of data follow the last tensor",
         lambda i: st_prefix(i, tail=bytes(16))),
        ("st-duplicate-name", 400, "the header names 'prompt_embeddings' twice",
         lambda i: mp(i, weights=safetensors_raw(
             b'{"prompt_embeddings": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
             + json.dumps(header_of(i.weights["prefix"])[0])[1:].encode(),
             header_of(i.weights["prefix"])[1]))),
        ("st-metadata-not-strings", 400, "the header's __metadata__ is {'format': 1}",
         lambda i: st_prefix(i, extra={"__metadata__": {"format": 1}})),
        ("st-metadata-list", 400, "the header's __metadata__ is ['pt']",
         lambda i: st_prefix(i, extra={"__metadata__": ["pt"]})),
        # -- the tensors
        ("tensor-extra", 400, "has unexpected tensor(s) 'prompt_encoder.default.embedding.weight'",
         lambda i: mp(i, weights=tensors_file(
             {PE: i.tensor(), "prompt_encoder.default.embedding.weight": i.tensor()}))),
        ("tensor-missing", 400, "has no 'prompt_embeddings' tensor (found: 'base_model.embed')",
         lambda i: mp(i, weights=tensors_file({"base_model.embed": i.tensor()}))),
        ("tensor-none", 400, "has no 'prompt_embeddings' tensor (found: none)",
         lambda i: mp(i, weights=safetensors_raw({"__metadata__": {"format": "pt"}}, b""))),
        ("tensor-nan-f32", 400, "has 1 NaN or infinite value(s) (first at row 2, column 7: nan)",
         lambda i: with_tensor(i, nan_at(i.tensor(), float("nan")))),
        ("tensor-inf-f32", 400, "(first at row 2, column 7: inf)",
         lambda i: with_tensor(i, nan_at(i.tensor(), float("inf")))),
        ("tensor-minus-inf-f32", 400, "(first at row 7, column 127: -inf)",
         lambda i: with_tensor(i, nan_at(i.tensor(), float("-inf"), 7, 127))),
        ("tensor-inf-f16", 400, "(first at row 0, column 0: inf)",
         lambda i: with_tensor(i, nan_at(i.tensor(), 1e6, 0, 0).half())),
        ("tensor-nan-bf16", 400, "(first at row 3, column 3: nan)",
         lambda i: with_tensor(i, nan_at(i.tensor(), float("nan"), 3, 3).bfloat16())),
        ("tensor-zero-rows", 400, nvt.format(8, 0),
         lambda i: with_tensor(i, torch.zeros(0, 128))),
        ("tensor-rank-0", 400, "prefix_tuning weights have shape []",
         lambda i: with_tensor(i, torch.tensor(1.0))),
        ("tensor-rank-1", 400, "prefix_tuning weights have shape [1024]; the base model needs "
         "[8, 128] (2 layers x 2 x 2 kv heads x 16 head dim)",
         lambda i: with_tensor(i, i.tensor().flatten())),
        ("tensor-rank-3", 400, "prefix_tuning weights have shape [8, 4, 32]",
         lambda i: with_tensor(i, i.tensor().view(8, 4, 32))),
    ]
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                  torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64):
        name = str(dtype).removeprefix("torch.")
        cases.append((f"dtype-{name}", 400,
                      f"prompt_embeddings has dtype {name}; expected float32, float16 or bfloat16",
                      lambda i, d=dtype: with_tensor(i, i.tensor().to(d))))
    for kind, rows in ROWS.items():
        cols, k = COLS[kind], KINDS[kind]
        need = f"the base model needs [{rows}, {cols}]"
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            r, c = rows + dr, cols + dc
            message = nvt.format(rows, r) if dr else f"{k} weights have shape [{rows}, {c}]; {need}"
            cases.append((f"shape-{kind}-{'rows' if dr else 'cols'}{dr + dc:+d}", 400, message,
                          lambda i, kind=kind, r=r, c=c: with_tensor(i, resized(r, c), kind)))
        cases.append((f"config-{kind}-num-virtual-tokens+1", 400, nvt.format(rows + 1, rows),
                      lambda i, kind=kind, rows=rows: mp(i, kind, config=i.cfg(
                          kind, num_virtual_tokens=rows + 1))))
    for what, cols in (("layers", 3 * 2 * 2 * 16), ("layers", 1 * 2 * 2 * 16),
                       ("kv-heads", 2 * 2 * 3 * 16), ("kv-heads", 2 * 2 * 1 * 16),
                       ("head-dim", 2 * 2 * 2 * 17), ("head-dim", 2 * 2 * 2 * 15)):
        cases.append((f"shape-prefix-{what}{'+1' if cols > 128 else '-1'}", 400,
                      f"prefix_tuning weights have shape [8, {cols}]",
                      lambda i, c=cols: with_tensor(i, resized(8, c))))
    cases += [
        # -- pickles and other files in the weights' place
        ("pickle-as-safetensors", 400, "(it looks like a Python pickle, such as a PEFT "
         "adapter_model.bin: pickles are never loaded",
         lambda i: mp(i, weights=pickle.dumps({PE: i.tensor().tolist()}, protocol=4))),
        ("pickle-protocol-2", 400, "it looks like a Python pickle",
         lambda i: mp(i, weights=pickle.dumps([1.0] * 64, protocol=2))),
        ("torch-save-as-safetensors", 400, "(it is a zip file: torch.save's format",
         lambda i: mp(i, weights=torch_saved({PE: i.tensor()}))),
        ("tgz-as-weights", 400, "(it is gzip-compressed: a .tar.gz is uploaded as 'archive')",
         lambda i: mp(i, weights=tar_gz_of(i.entries()))),
        ("config-as-weights", 400, "(it looks like JSON: is it adapter_config.json?)",
         lambda i: mp(i, weights=i.configs["prefix"])),
        ("zip-with-adapter-model-bin", 400, "the archive holds 'my-adapter/adapter_model.bin', "
         "a pickle, which is never loaded; expected adapter_model.safetensors",
         lambda i: arch(zip_of({"my-adapter/" + CONFIG: i.configs["prefix"],
                                "my-adapter/adapter_model.bin": torch_saved({PE: i.tensor()})}))),
        ("tgz-pickle-named-safetensors", 400, "it looks like a Python pickle",
         lambda i: arch(tar_gz_of({CONFIG: i.configs["prefix"],
                                   WEIGHTS: pickle.dumps({PE: 1}, protocol=5)}))),
        # -- the config
        ("config-empty", 400, "adapter_config.json is not valid JSON", lambda i: mp(i, config=b"")),
        ("config-not-json", 400, "adapter_config.json is not valid JSON",
         lambda i: mp(i, config=b"{peft_type: PREFIX_TUNING}")),
        ("config-not-utf8", 400, "adapter_config.json is not valid JSON",
         lambda i: mp(i, config=b'{"peft_type": "\xff"}')),
        ("config-deep", 400, "adapter_config.json is not valid JSON",
         lambda i: mp(i, config=b"[" * 30_000 + b"]" * 30_000)),
        ("config-5000-digits", 400, "adapter_config.json is not valid JSON",
         lambda i: mp(i, config=b'{"num_virtual_tokens": 1' + b"0" * 5000 + b"}")),
        ("config-list", 400, "adapter_config.json holds a JSON list; expected a JSON object",
         lambda i: mp(i, config=b"[]")),
        ("config-too-large", 413, "config is 70000 bytes; the limit is 65536 bytes",
         lambda i: mp(i, config=i.configs["prefix"][:-1] + b" " * (70_000 - len(
             i.configs["prefix"])) + b"}")),
        ("config-peft-type-lora", 400, "peft_type 'LORA' is not supported; supported types: "
         "PREFIX_TUNING, PROMPT_TUNING, P_TUNING", lambda i: mp(i, config=i.cfg(peft_type="LORA"))),
        ("config-peft-type-lowercase", 400, "peft_type 'prefix_tuning' is not supported",
         lambda i: mp(i, config=i.cfg(peft_type="prefix_tuning"))),
        ("config-peft-type-missing", 400, "peft_type None is not supported",
         lambda i: mp(i, config=i.cfg(peft_type=None))),
        ("config-peft-type-number", 400, "peft_type 5 is not supported",
         lambda i: mp(i, config=i.cfg(peft_type=5))),
        ("config-task-type", 400, "task_type 'SEQ_CLS' is not supported; expected 'CAUSAL_LM'",
         lambda i: mp(i, config=i.cfg(task_type="SEQ_CLS"))),
        ("config-nvt-string", 400, "num_virtual_tokens is '8'; expected a positive integer",
         lambda i: mp(i, config=i.cfg(num_virtual_tokens="8"))),
        ("config-nvt-float", 400, "num_virtual_tokens is 8.0; expected a positive integer",
         lambda i: mp(i, config=i.cfg(num_virtual_tokens=8.0))),
        ("config-nvt-bool", 400, "num_virtual_tokens is True; expected a positive integer",
         lambda i: mp(i, config=i.cfg(num_virtual_tokens=True))),
        ("config-nvt-zero", 400, "num_virtual_tokens is 0; expected a positive integer",
         lambda i: mp(i, config=i.cfg(num_virtual_tokens=0))),
        ("config-nvt-negative", 400, "num_virtual_tokens is -8; expected a positive integer",
         lambda i: mp(i, config=i.cfg(num_virtual_tokens=-8))),
        ("config-nvt-missing", 400, "adapter_config.json has no num_virtual_tokens",
         lambda i: mp(i, config=i.cfg(num_virtual_tokens=None))),
        ("config-nvt-over-limit", 400, "num_virtual_tokens is 513; this server accepts at most 512",
         lambda i: mp(i, config=i.cfg(num_virtual_tokens=513))),
        ("config-nvt-huge", 400, "num_virtual_tokens is 1000000000000000000000000000000; this",
         lambda i: mp(i, config=i.cfg(num_virtual_tokens=10**30))),
        ("config-num-layers-string", 400, "num_layers is '2'; expected an integer",
         lambda i: mp(i, config=i.cfg(num_layers="2"))),
        ("config-num-layers-4000-digits", 400, "has num_layers=9999999999999999999999999999",
         lambda i: mp(i, config=i.cfg(num_layers=10**4000 - 1))),
        ("config-num-layers-3", 400, "adapter_config.json has num_layers=3; the base model needs 2",
         lambda i: mp(i, config=i.cfg(num_layers=3))),
        ("config-all-heads", 400, "num_attention_heads=4; the base model needs 2",
         lambda i: mp(i, config=i.cfg(num_attention_heads=4))),
        ("config-prefix-token-dim", 400, "token_dim=64; the base model needs 32",
         lambda i: mp(i, config=i.cfg(token_dim=64))),
        ("config-prompt-token-dim", 400, "token_dim=65; the base model needs 64",
         lambda i: mp(i, "prompt", config=i.cfg("prompt", token_dim=65))),
        ("config-ptuning-token-dim-list", 400, "token_dim is [64]; expected an integer",
         lambda i: mp(i, "ptuning", config=i.cfg("ptuning", token_dim=[64]))),
        ("config-submodules", 400, "num_transformer_submodules=2; the base model needs 1",
         lambda i: mp(i, config=i.cfg(num_transformer_submodules=2))),
        ("config-projection-string", 400, "prefix_projection is 'yes'; expected true or false",
         lambda i: mp(i, config=i.cfg(prefix_projection="yes"))),
        ("config-kind-vs-weights", 400, "prompt_tuning weights have shape [8, 128]; the base "
         "model needs [8, 64]", lambda i: mp(i, config=i.cfg("prompt", num_virtual_tokens=8))),
        # -- archives: links, paths, duplicates, layout
        ("zip-symlink-weights", 400, "the archive entry 'adapter_model.safetensors' is a link",
         lambda i: arch(zip_of({CONFIG: i.configs["prefix"]}, {WEIGHTS: "/etc/passwd"}))),
        ("zip-symlink-readme", 400, "the archive entry 'README.md' is a link or a special file",
         lambda i: arch(zip_of({CONFIG: i.configs["prefix"], WEIGHTS: i.weights["prefix"]},
                                {"README.md": "../../etc/passwd"}))),
        ("zip-fifo", 400, "the archive entry 'pipe' is a link or a special file",
         lambda i: arch(zip_raw([ZipEntry(CONFIG, deflate(i.configs["prefix"])),
                                 ZipEntry("pipe", stored(b""), method=0, mode=0o010644)]))),
        ("tgz-symlink-weights", 400, "the archive entry 'adapter_model.safetensors' is a link",
         lambda i: arch(tar_gz_of({CONFIG: i.configs["prefix"]}, {WEIGHTS: "/etc/passwd"}))),
        ("tgz-hardlink-weights", 400, "the archive entry 'a/adapter_model.safetensors' is a link",
         lambda i: arch(tgz_with([(member("a/" + CONFIG, len(i.configs["prefix"])),
                                   i.configs["prefix"]),
                                  (member("a/" + WEIGHTS, 0, tarfile.LNKTYPE, "/etc/x"), b"")]))),
        ("tgz-hardlink-readme", 400, "the archive entry 'README.md' is a link",
         lambda i: arch(tgz_with(i.members() + [(member("README.md", 0, tarfile.LNKTYPE,
                                                        "my-adapter/README.md"), b"")]))),
        ("tgz-fifo", 400, "the archive entry 'pipe' is a link or a special file",
         lambda i: arch(tgz_with(i.members() + [(member("pipe", 0, tarfile.FIFOTYPE), b"")]))),
        ("tgz-char-device", 400, "the archive entry 'dev/zero' is a link or a special file",
         lambda i: arch(tgz_with(i.members() + [(member("dev/zero", 0, tarfile.CHRTYPE), b"")]))),
        ("zip-absolute-path", 400, "unsafe path in the archive: '/adapter_config.json'",
         lambda i: arch(zip_of({"/" + CONFIG: i.configs["prefix"], WEIGHTS: i.weights["prefix"]}))),
        ("tgz-absolute-path", 400, "unsafe path in the archive: '/tmp/adapter_model.safetensors'",
         lambda i: arch(tar_gz_of({CONFIG: i.configs["prefix"],
                                   "/tmp/" + WEIGHTS: i.weights["prefix"]}))),
        ("zip-dotdot-path", 400, "unsafe path in the archive: '../adapter_config.json'",
         lambda i: arch(zip_of({"../" + CONFIG: i.configs["prefix"],
                                WEIGHTS: i.weights["prefix"]}))),
        ("tgz-dotdot-readme", 400, "unsafe path in the archive: 'my-adapter/../../README.md'",
         lambda i: arch(tar_gz_of(i.entries() | {"my-adapter/../../README.md": b"x"}))),
        ("zip-backslash-path", 400, "unsafe path in the archive: '..\\\\adapter_config.json'",
         lambda i: arch(zip_raw([ZipEntry("..\\" + CONFIG, deflate(i.configs["prefix"])),
                                 ZipEntry(WEIGHTS, deflate(i.weights["prefix"]))]))),
        ("zip-drive-path", 400, "unsafe path in the archive: 'C:/adapter_config.json'",
         lambda i: arch(zip_raw([ZipEntry("C:/" + CONFIG, deflate(i.configs["prefix"])),
                                 ZipEntry(WEIGHTS, deflate(i.weights["prefix"]))]))),
        ("zip-duplicate-name", 400, "the archive holds adapter_model.safetensors twice "
         "('adapter_model.safetensors' and 'adapter_model.safetensors')",
         lambda i: arch(zip_raw([ZipEntry(CONFIG, deflate(i.configs["prefix"])),
                                 ZipEntry(WEIGHTS, deflate(i.weights["prefix"])),
                                 ZipEntry(WEIGHTS, deflate(i.weights["prompt"]))]))),
        ("tgz-duplicate-name", 400, "the archive holds adapter_config.json twice",
         lambda i: arch(tgz_with(i.members() + [(member("my-adapter/" + CONFIG, 2), b"{}")]))),
        ("zip-two-adapters", 400, "the archive holds adapter_config.json twice ('a/adapter_config"
         ".json' and 'b/adapter_config.json')",
         lambda i: arch(zip_of(i.entries(top="a/") | i.entries("prompt", top="b/")))),
        ("zip-nested-too-deep", 400, "the archive holds adapter_config.json only at "
         "'out/checkpoint-100/adapter_config.json', nested too deep",
         lambda i: arch(zip_of(i.entries(top="out/checkpoint-100/")))),
        ("tgz-nested-too-deep", 400, "nested too deep",
         lambda i: arch(tar_gz_of(i.entries(top="a/b/c/d/")))),
        ("zip-split-directories", 400, "must sit in the same directory",
         lambda i: arch(zip_of({"a/" + CONFIG: i.configs["prefix"],
                                "b/" + WEIGHTS: i.weights["prefix"]}))),
        ("zip-no-config", 400, "the archive has no adapter_config.json at its top level",
         lambda i: arch(zip_of({WEIGHTS: i.weights["prefix"], "README.md": b"x"}))),
        ("tgz-no-weights", 400, "the archive has no adapter_model.safetensors at its top level",
         lambda i: arch(tar_gz_of({CONFIG: i.configs["prefix"]}))),
        ("zip-directories-only", 400, "the archive has no adapter_config.json",
         lambda i: arch(zip_of({"my-adapter/": b"", "my-adapter/" + CONFIG + "/": b""}))),
        ("zip-no-entries", 400, "the archive has no adapter_config.json",
         lambda i: arch(zip_with({}))),
        ("zip-65-entries", 400, "the archive has over 64 entries",
         lambda i: arch(zip_of(i.entries() | {f"f{n}.txt": b"" for n in range(62)}))),
        ("tgz-65-entries", 400, "the archive has over 64 entries",
         lambda i: arch(tar_gz_of(i.entries() | {f"f{n}.txt": b"" for n in range(62)}))),
        ("zip-config-not-json", 400, "adapter_config.json is not valid JSON",
         lambda i: arch(zip_of(i.entries() | {"my-adapter/" + CONFIG: b"\x00\x01"}))),
        # -- archives: corrupt, odd, other formats
        ("archive-empty", 400, "the archive is empty (0 bytes)", lambda i: arch(b"")),
        ("zip-truncated", 400, "the archive is corrupt or unsupported",
         lambda i: arch(zip_of(i.entries())[:-30])),
        ("zip-cut-in-half", 400, "the archive is corrupt or unsupported",
         lambda i: arch(zip_of(i.entries())[:1500])),
        ("zip-bad-crc", 400, "the archive is corrupt or unsupported: BadZipFile: Bad CRC-32",
         lambda i: arch(zip_raw([ZipEntry(CONFIG, deflate(i.configs["prefix"])), ZipEntry(
             WEIGHTS, Deflated(i.weights["prefix"], 1234, len(i.weights["prefix"])), 0)]))),
        ("zip-encrypted", 400, "encrypted archives are not accepted",
         lambda i: arch(zip_raw([ZipEntry(CONFIG, deflate(i.configs["prefix"]), flags=1),
                                 ZipEntry(WEIGHTS, deflate(i.weights["prefix"]))]))),
        ("zip-unknown-method", 400, "the archive entry 'adapter_config.json' uses compression "
         "method 99; only stored (0) and deflate (8) are accepted",
         lambda i: arch(zip_raw([ZipEntry(CONFIG, deflate(i.configs["prefix"]), method=99),
                                 ZipEntry(WEIGHTS, deflate(i.weights["prefix"]))]))),
        ("zip-bzip2", 400, "uses compression method 12",
         lambda i: arch(zip_with(i.entries(), zipfile.ZIP_BZIP2))),
        ("zip-lzma", 400, "uses compression method 14",
         lambda i: arch(zip_with(i.entries(), zipfile.ZIP_LZMA))),
        ("zip-directory-offset-lie", 400,
         "the archive is corrupt or unsupported: ValueError: negative seek value",
         lambda i: arch(directory_offset_lie(zip_of(i.entries())))),
        ("zip-names-differ", 400, "the archive is corrupt or unsupported: BadZipFile",
         lambda i: arch(zip_of(i.entries(top="")).replace(
             b"adapter_config.json", b"adapter_config.jsoN", 1))),
        ("tgz-truncated", 400, "the archive is corrupt or unsupported: EOFError",
         lambda i: arch(tar_gz_of(i.entries())[:-100])),
        ("tgz-bad-crc", 400, "incorrect data check",
         lambda i: arch(crc_flipped(tar_gz_of(i.entries())))),
        ("tgz-garbage-after", 400, "the archive is corrupt or unsupported",
         lambda i: arch(tar_gz_of(i.entries()) + b"garbage")),
        ("gzip-not-tar", 400, "the archive is corrupt or unsupported: ReadError",
         lambda i: arch(gzip_of(i.weights["prefix"]))),
        ("gzip-empty", 400, "the archive is corrupt or unsupported: ReadError: empty file",
         lambda i: arch(gzip_of(b""))),
        ("tar-uncompressed", 415, "the archive is neither a .zip nor a .tar.gz file",
         lambda i: arch(tar_raw(i.members()))),
        ("tar-bz2", 415, "neither a .zip nor a .tar.gz",
         lambda i: arch(b"BZh91AY&SY" + bytes(64))),
        ("tar-xz", 415, "neither a .zip nor a .tar.gz",
         lambda i: arch(b"\xfd7zXZ\x00" + bytes(64))),
        ("rar", 415, "neither a .zip nor a .tar.gz",
         lambda i: arch(b"Rar!\x1a\x07\x00" + bytes(64))),
        ("7z", 415, "neither a .zip nor a .tar.gz",
         lambda i: arch(b"7z\xbc\xaf\x27\x1c" + bytes(64))),
        ("safetensors-as-archive", 415, "neither a .zip nor a .tar.gz",
         lambda i: arch(i.weights["prefix"])),
        ("archive-as-text-field", 415, "neither a .zip nor a .tar.gz",
         lambda i: form_fields({"name": "x", "archive": "adapter.zip"})),
        # -- decompression bombs (1 GiB inflated; memory and time measured)
        ("bomb-zip-weights", 413, "the archive declares 107374",
         lambda i: arch(zip_raw([ZipEntry(CONFIG, deflate(i.cfg(task_type=None))),
                                 ZipEntry(WEIGHTS, i.zeros)]))),
        ("bomb-zip-readme", 413, "the archive declares 107374", lambda i: arch(zip_raw(
            [ZipEntry(n, deflate(d)) for n, d in i.entries().items() if "README" not in n]
            + [ZipEntry("my-adapter/README.md", i.zeros)]))),
        ("bomb-zip-declared-small", 400, bad_st + "the header is not valid JSON",
         lambda i: arch(zip_raw([ZipEntry(CONFIG, deflate(i.configs["prefix"])), ZipEntry(
             WEIGHTS, Deflated(i.zeros.data, deflate(bytes(4096)).crc, 4096))]))),
        ("bomb-zip-declared-4GiB", 413, "the archive declares 42949",
         lambda i: arch(zip_raw([ZipEntry(n, deflate(d), declared=2**32 - 2 if "README" in n
                                          else None) for n, d in i.entries().items()]))),
        ("bomb-tgz-readme", 413, "the archive entry 'my-adapter/README.md' declares 1073741824 "
         "bytes; the archive may decompress to at most",
         lambda i: arch(tgz_bomb(i.members()[:2], "my-adapter/README.md", BOMB_MIB))),
        ("bomb-tgz-weights", 413, "the archive entry 'adapter_model.safetensors' declares "
         "1073741824 bytes", lambda i: arch(tgz_bomb([], WEIGHTS, BOMB_MIB))),
        ("bomb-tgz-trailing", 413, "the archive decompresses to over",
         lambda i: arch(tar_gz_of(i.entries()) + gzip_member(i.zeros))),
        ("bomb-tgz-pax-header", 400, "the archive has a 1073741824-byte extended header",
         lambda i: arch(tgz_bomb([], "././@PaxHeader", BOMB_MIB, tarfile.XHDTYPE))),
        ("bomb-tgz-gnu-longname", 400, "the archive has a 1073741824-byte extended header",
         lambda i: arch(tgz_bomb([], "././@LongLink", BOMB_MIB, tarfile.GNUTYPE_LONGNAME))),
        ("tgz-long-name-chain", 400, "too many tar extended headers in a row",
         lambda i: arch(gzip_of(tar_raw([(member("././@LongLink", 512, tarfile.GNUTYPE_LONGNAME),
                                          b"x" * 511 + b"\0")] * 3000 + i.members())))),
        ("bomb-gzip-member-flood", 400, "the archive has over 65536 gzip members",
         lambda i: arch(tar_gz_of(i.entries()) + gzip_of(b"") * 70_000)),
        # -- the request itself
        ("content-type-text", 415, "unsupported content type 'text/plain'",
         lambda i: Req(content=i.weights["prefix"], headers={"content-type": "text/plain"})),
        ("content-type-octet-stream", 415, "unsupported content type 'application/octet-stream'",
         lambda i: Req(content=i.weights["prefix"],
                       headers={"content-type": "application/octet-stream"})),
        ("content-type-zip", 415, "unsupported content type 'application/zip'",
         lambda i: Req(content=zip_of(i.entries()), headers={"content-type": "application/zip"})),
        ("content-type-form-urlencoded", 415, "'application/x-www-form-urlencoded'",
         lambda i: Req(content=b"name=x&config=y",
                       headers={"content-type": "application/x-www-form-urlencoded"})),
        ("content-type-none", 415, "unsupported content type 'none'",
         lambda i: Req(content=zip_of(i.entries()), headers={})),
        ("json-with-archive-bytes", 400, "the request body is not valid JSON",
         lambda i: Req(content=zip_of(i.entries()), headers={"content-type": "application/json"})),
        ("json-peft-config", 400, "text: Field required",
         lambda i: Req(content=json.dumps({"name": "x", "config": json.loads(
             i.configs["prefix"])}).encode(), headers={"content-type": "application/json"})),
        ("multipart-no-boundary", 400, "boundary",
         lambda i: Req(content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data"})),
        ("multipart-garbage", 400, "Invalid multipart data",
         lambda i: Req(content=b"\x00garbage" * 100,
                       headers={"content-type": "multipart/form-data; boundary=xyz"})),
        ("form-weights-twice", 400, "the form field 'weights' appears twice",
         lambda i: Req(files=[("config", i.configs["prefix"]), ("weights", i.weights["prefix"]),
                              ("weights", i.weights["prefix"])])),
        ("form-too-many-files", 400, "Too many files",
         lambda i: Req(files={"config": b"{}", "weights": b"", "archive": b"", "x": b""})),
        ("form-weights-only", 400, "send either 'config' (adapter_config.json) and 'weights'",
         lambda i: Req(files={"weights": i.weights["prefix"]})),
        ("form-config-and-archive", 400, "send either 'config'",
         lambda i: Req(files={"config": i.configs["prefix"], "archive": zip_of(i.entries())})),
        ("form-weights-as-text-field", 400, bad_st + "5 bytes is too short",
         lambda i: Req(files={"config": i.configs["prefix"]}, fields={"weights": "hello"})),
        ("form-empty-name", 400, "invalid adapter name ''",
         lambda i: Req(files={"config": i.configs["prefix"], "weights": i.weights["prefix"]},
                       fields={"name": ""})),
    ]
    return cases
# fmt: on


CASES = _cases()

EXTRAS = {
    "my-adapter/README.md": b"# model card\n",
    "my-adapter/adapter_model.bin": pickle.dumps({PE: [0.0]}),  # skipped unread
    "my-adapter/training_args.bin": pickle.dumps({"lr": 1e-3}),
    "my-adapter/tokenizer.json": b"{}",
    "my-adapter/checkpoint-100/adapter_config.json": b"not even json",  # nested: not read
    "my-adapter/checkpoint-100/": b"",
    "logs/events.out": bytes(range(256)) * 64,
}


# fmt: off
def _valid() -> list[tuple[str, str, bool, Callable[[Inputs], Req]]]:
    """(id, kind, same content as the seeded adapter of that kind, request builder)."""
    return [
        ("multipart-prefix", "prefix", True, lambda i: mp(i, "prefix")),
        ("multipart-prompt", "prompt", True, lambda i: mp(i, "prompt")),
        ("multipart-ptuning", "ptuning", True, lambda i: mp(i, "ptuning")),
        ("zip-top-level", "prompt", True, lambda i: arch(zip_of(i.entries("prompt", top="")))),
        ("zip-in-a-directory", "ptuning", True, lambda i: arch(zip_of(i.entries("ptuning")))),
        ("zip-stored", "prefix", True,
         lambda i: arch(zip_with(i.entries(), zipfile.ZIP_STORED))),
        ("zip-with-extra-files", "prefix", True, lambda i: arch(zip_of(i.entries() | EXTRAS))),
        ("tgz-top-level", "prefix", True, lambda i: arch(tar_gz_of(i.entries(top="")))),
        ("tgz-with-extra-files", "prompt", True,
         lambda i: arch(tar_gz_of(i.entries("prompt") | EXTRAS))),
        ("tgz-pax-format", "ptuning", True,
         lambda i: arch(tgz_with(i.members("ptuning"), tarfile.PAX_FORMAT))),
        ("tgz-two-gzip-members", "prefix", True, lambda i: arch(
            gzip_of(tar_raw(i.members())[:1000]) + gzip_of(tar_raw(i.members())[1000:]))),
        ("tgz-zero-padded", "prefix", True, lambda i: arch(tar_gz_of(i.entries()) + bytes(4096))),
        ("tgz-dot-slash-paths", "prompt", True,
         lambda i: arch(tar_gz_of(i.entries("prompt", top="./")))),
        ("zip-dot-and-double-slashes", "ptuning", True, lambda i: arch(zip_of({
            "./a/" + CONFIG: i.configs["ptuning"], "a//" + WEIGHTS: i.weights["ptuning"]}))),
        ("weights-float16", "prefix", False, lambda i: with_tensor(i, i.tensor().half())),
        ("weights-bfloat16", "prompt", False,
         lambda i: with_tensor(i, i.tensor("prompt").bfloat16(), "prompt")),
        ("weights-no-metadata", "prefix", True,
         lambda i: mp(i, weights=safetensors_raw(*header_of(i.weights["prefix"])))),
        ("config-minimal", "prefix", True, lambda i: mp(i, config=json.dumps(
            {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}).encode())),
        ("config-unknown-fields", "ptuning", True,
         lambda i: mp(i, "ptuning", config=i.cfg("ptuning", future={"a": [1]}, revision="x"))),
        ("config-prefix-projection", "prefix", True,
         lambda i: mp(i, config=i.cfg(prefix_projection=True, encoder_hidden_size=24))),
        ("misleading-part-types", "prefix", True, lambda i: Req(files={
            "config": ("model.png", i.configs["prefix"], "image/png"),
            "weights": ("weights.txt", i.weights["prefix"], "text/plain")})),
        ("archive-named-rar", "prompt", True, lambda i: Req(files={
            "archive": ("adapter.rar", zip_of(i.entries("prompt")), "application/x-rar")})),
    ]
# fmt: on


VALID = _valid()
