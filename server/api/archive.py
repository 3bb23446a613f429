"""Reading a PEFT output directory uploaded as ``.zip`` or ``.tar.gz``, in memory, safely.

Nothing is written to disk. Only ``adapter_config.json`` and ``adapter_model.safetensors``
are read (at the archive's top level or inside one top-level directory, as zipping the
directory ``PeftModel.save_pretrained`` wrote gives); other regular files there, such as the
README.md PEFT writes, are skipped unread. The whole archive is refused when any entry is a
link or a device, has an absolute path or a ``..`` component, when an expected file appears
twice, or when a size limit is passed: the compressed size (the upload limit), each file's
declared and actual size, and the total decompressed size of a ``.tar.gz``.
"""

from __future__ import annotations

import io
import posixpath
import stat
import struct
import tarfile
import zipfile
import zlib

from adapters_store.formats import CONFIG_NAME, WEIGHTS_NAME
from adapters_store.validate import AdapterError, AdapterLimits, AdapterTooLargeError, check_size

MAX_ENTRIES = 64
MAX_ZIP_DIRECTORY_BYTES = 1 << 20
EXTRA_BYTES = 1 << 20  # room for README.md and tar headers in a .tar.gz's decompressed total


class UnsupportedArchive(AdapterError):
    """Not a .zip nor a .tar.gz (HTTP 415)."""


def read_archive(data: bytes, limits: AdapterLimits) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` bytes from an archive's bytes."""
    try:
        if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return _from_zip(data, limits)
        if data[:2] == b"\x1f\x8b":
            return _from_tar(_gunzip(data, _tar_budget(limits)), limits)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, NotImplementedError) as e:
        raise AdapterError(f"the archive is corrupt or unsupported: {e}", param="archive") from e
    raise UnsupportedArchive(
        "the archive is neither a .zip nor a .tar.gz file; upload the directory that "
        "PeftModel.save_pretrained wrote in one of those, or its two files as 'config' and "
        "'weights'",
        param="archive",
    )


def _wanted(path: str) -> str | None:
    """The expected file a member path names, or None for one to skip; raises for an unsafe
    path."""
    if path.startswith("/") or "\\" in path or (len(path) > 1 and path[1] == ":"):
        raise AdapterError(f"unsafe path in the archive: {path!r}", param="archive")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AdapterError(f"unsafe path in the archive: {path!r}", param="archive")
    if len(parts) in (1, 2) and parts[-1] in (CONFIG_NAME, WEIGHTS_NAME):
        return parts[-1]
    return None


def _limit(name: str, limits: AdapterLimits) -> int:
    return limits.max_config_bytes if name == CONFIG_NAME else limits.max_file_bytes


def _param(name: str) -> str:
    return "config" if name == CONFIG_NAME else "weights"


def _collect(found: dict[str, tuple[str, bytes]], name: str, path: str, data: bytes) -> None:
    if name in found:
        raise AdapterError(
            f"the archive holds {name} twice ({found[name][0]!r} and {path!r})", param="archive"
        )
    found[name] = (path, data)


def _result(found: dict[str, tuple[str, bytes]]) -> tuple[bytes, bytes]:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if name not in found:
            raise AdapterError(
                f"the archive has no {name}; expected the files PeftModel.save_pretrained "
                "writes (pickled adapter_model.bin files are not accepted)",
                param="archive",
            )
    dirs = {posixpath.dirname(p) for p, _ in found.values()}
    if len(dirs) != 1:
        raise AdapterError(
            f"{CONFIG_NAME} and {WEIGHTS_NAME} must sit in the same directory", param="archive"
        )
    return found[CONFIG_NAME][1], found[WEIGHTS_NAME][1]


def _from_zip(data: bytes, limits: AdapterLimits) -> tuple[bytes, bytes]:
    _check_zip_directory(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
        if len(entries) > MAX_ENTRIES:
            raise AdapterError(f"the archive has over {MAX_ENTRIES} entries", param="archive")
        found: dict[str, tuple[str, bytes]] = {}
        for info in entries:
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise AdapterError(
                    f"the archive entry {info.filename!r} is a link or a special file",
                    param="archive",
                )
            name = _wanted(info.filename)
            if name is None or info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise AdapterError("encrypted archives are not accepted", param="archive")
            limit = _limit(name, limits)
            check_size(info.file_size, limit, name, _param(name))  # declared, before reading
            with archive.open(info) as f:
                content = f.read(limit + 1)
            check_size(len(content), limit, name, _param(name))  # actual, after
            _collect(found, name, info.filename, content)
    return _result(found)


def _check_zip_directory(data: bytes) -> None:
    """Refuse a central directory too large to parse cheaply (millions of tiny entries)
    before ``zipfile`` builds an object per entry."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - (1 << 16) - 22))
    if end < 0 or end + 22 > len(data):
        raise zipfile.BadZipFile("no end of central directory record")
    (directory_size,) = struct.unpack_from("<I", data, end + 12)
    if directory_size == 0xFFFFFFFF or directory_size > MAX_ZIP_DIRECTORY_BYTES:
        raise AdapterError("the archive's directory is too large (zip64?)", param="archive")


def _tar_budget(limits: AdapterLimits) -> int:
    return limits.max_file_bytes + limits.max_config_bytes + EXTRA_BYTES


def _gunzip(data: bytes, budget: int) -> bytes:
    """Decompress at most ``budget`` bytes (a gzip bomb stops here, with memory bounded)."""
    out = bytearray()
    while data:
        d = zlib.decompressobj(wbits=31)
        out += d.decompress(data, budget + 1 - len(out))
        if len(out) > budget or d.unconsumed_tail:
            raise AdapterTooLargeError(
                f"the archive decompresses to over {budget} bytes", param="archive"
            )
        if not d.eof:
            raise EOFError("truncated gzip stream")
        data = d.unused_data
    return bytes(out)


def _from_tar(data: bytes, limits: AdapterLimits) -> tuple[bytes, bytes]:
    found: dict[str, tuple[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for count, member in enumerate(archive, start=1):
            if count > MAX_ENTRIES:
                raise AdapterError(f"the archive has over {MAX_ENTRIES} entries", param="archive")
            if not (member.isfile() or member.isdir()):
                raise AdapterError(
                    f"the archive entry {member.name!r} is a link or a special file",
                    param="archive",
                )
            name = _wanted(member.name)
            if name is None or member.isdir():
                continue
            limit = _limit(name, limits)
            check_size(member.size, limit, name, _param(name))
            f = archive.extractfile(member)
            assert f is not None  # a regular file
            content = f.read(limit + 1)
            check_size(len(content), limit, name, _param(name))
            _collect(found, name, member.name, content)
    return _result(found)
