"""Reading a PEFT output directory uploaded as ``.zip`` or ``.tar.gz``, in memory, safely.

Nothing is written to disk. Only ``adapter_config.json`` and ``adapter_model.safetensors``
are read (at the archive's top level or inside one top-level directory, as zipping the
directory ``PeftModel.save_pretrained`` wrote gives); other regular files there, such as the
README.md PEFT writes, are skipped unread. The whole archive is refused when any entry is a
link or a device, has an absolute path or a ``..`` component, when an expected file appears
twice, or when a size limit is passed.

Decompression bombs: the compressed size is bounded by the upload limit; the uncompressed
size of every entry, and of the whole archive, is checked against the limits as declared
(zip directory, tar headers) before anything is inflated, and again as inflated. A
``.tar.gz`` is inflated as a stream (memory: the two expected files and one buffer), to its
end, so that its checksum is verified, and stops at the total budget.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib

from adapters_store.formats import CONFIG_NAME, WEIGHTS_NAME
from adapters_store.validate import AdapterError, AdapterLimits, AdapterTooLargeError, check_size

MAX_ENTRIES = 64
MAX_ZIP_DIRECTORY_BYTES = 1 << 20
MAX_TAR_META_BYTES = 64 << 10  # a pax or GNU long-name header: a few hundred bytes in practice
MAX_GZIP_MEMBERS = 1 << 16  # bgzip writes one per 64 KiB; more is a CPU-time attack
EXTRA_BYTES = 1 << 20  # room for README.md and tar headers in an archive's decompressed total
PICKLE_NAME = "adapter_model.bin"
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# What the standard library raises for a malformed archive, besides our own AdapterError:
# BadZipFile, TarError, EOFError, zlib.error, NotImplementedError (a zip feature), RuntimeError
# (zip encryption), and ValueError, struct.error, OverflowError (fields out of range, such as
# zipfile's "negative seek value").
_CORRUPT = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    ValueError,
    struct.error,
    OverflowError,
)


class UnsupportedArchive(AdapterError):
    """Not a .zip nor a .tar.gz (HTTP 415)."""


def read_archive(data: bytes, limits: AdapterLimits) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` bytes from an archive's bytes."""
    if not data:
        raise AdapterError("the archive is empty (0 bytes)", param="archive")
    try:
        if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return _from_zip(data, limits)
        if data[:2] == b"\x1f\x8b":
            return _from_tar(data, limits)
    except AdapterError:
        raise
    except RecursionError:  # tarfile reads a chain of extended headers recursively
        raise AdapterError(
            "the archive is corrupt: too many tar extended headers in a row", param="archive"
        ) from None
    except _CORRUPT as e:
        raise AdapterError(
            f"the archive is corrupt or unsupported: {type(e).__name__}: {_cut(str(e))}",
            param="archive",
        ) from None
    raise UnsupportedArchive(
        "the archive is neither a .zip nor a .tar.gz file; upload the directory that "
        "PeftModel.save_pretrained wrote in one of those, or its two files as 'config' and "
        "'weights'",
        param="archive",
    )


def archive_budget(limits: AdapterLimits) -> int:
    """The most an archive may decompress to, in all."""
    return limits.max_file_bytes + limits.max_config_bytes + EXTRA_BYTES


def _limit(name: str, limits: AdapterLimits) -> int:
    return limits.max_config_bytes if name == CONFIG_NAME else limits.max_file_bytes


def _param(name: str) -> str:
    return "config" if name == CONFIG_NAME else "weights"


def _cut(text: str, most: int = 160) -> str:
    return text if len(text) <= most else text[:most] + "..."


class _Members:
    """The two expected files an archive's entries give, and what explains a missing one."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[str, str, bytes]] = {}  # name -> (path, directory, data)
        self.too_deep: dict[str, str] = {}  # expected name -> a path it was found at
        self.pickles: list[str] = []

    def wanted(self, path: str) -> str | None:
        """The expected file ``path`` names, or None for one to skip; raises for an unsafe
        path."""
        parts = _parts(path)
        name = parts[-1] if parts else ""
        if name in (CONFIG_NAME, WEIGHTS_NAME):
            if len(parts) <= 2:
                return name
            self.too_deep.setdefault(name, path)
        elif name == PICKLE_NAME:
            self.pickles.append(path)
        return None

    def add(self, name: str, path: str, data: bytes) -> None:
        if name in self.found:
            raise AdapterError(
                f"the archive holds {name} twice ({_cut(repr(self.found[name][0]))} and "
                f"{_cut(repr(path))})",
                param="archive",
            )
        self.found[name] = (path, "/".join(_parts(path)[:-1]), data)

    def result(self) -> tuple[bytes, bytes]:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if name not in self.found:
                raise AdapterError(self._missing(name), param="archive")
        if len({directory for _, directory, _ in self.found.values()}) != 1:
            raise AdapterError(
                f"{CONFIG_NAME} and {WEIGHTS_NAME} must sit in the same directory",
                param="archive",
            )
        return self.found[CONFIG_NAME][2], self.found[WEIGHTS_NAME][2]

    def _missing(self, name: str) -> str:
        where = "at its top level or inside one top-level directory"
        if name in self.too_deep:
            return (
                f"the archive holds {name} only at {_cut(repr(self.too_deep[name]))}, nested too "
                f"deep; expected it {where} (archive the directory PeftModel.save_pretrained "
                "wrote)"
            )
        if name == WEIGHTS_NAME and self.pickles:
            return (
                f"the archive holds {_cut(repr(self.pickles[0]))}, a pickle, which is never "
                f"loaded; expected {WEIGHTS_NAME} (save with safe_serialization=True)"
            )
        return (
            f"the archive has no {name} {where}; expected the files PeftModel.save_pretrained "
            "writes (pickled adapter_model.bin files are not accepted)"
        )


def _parts(path: str) -> list[str]:
    """A member path's components (``.`` and empty ones dropped); raises for an absolute path,
    a drive letter, a backslash or a ``..`` component."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or "\\" in path or path[1:2] == ":" or ".." in parts:
        raise AdapterError(f"unsafe path in the archive: {_cut(repr(path))}", param="archive")
    return parts


# -- zip


def _from_zip(data: bytes, limits: AdapterLimits) -> tuple[bytes, bytes]:
    _check_zip_directory(data)
    members = _Members()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
        if len(entries) > MAX_ENTRIES:
            raise AdapterError(f"the archive has over {MAX_ENTRIES} entries", param="archive")
        declared = sum(info.file_size for info in entries)
        if declared > archive_budget(limits):
            raise AdapterTooLargeError(
                f"the archive declares {declared} bytes uncompressed; the limit is "
                f"{archive_budget(limits)} bytes",
                param="archive",
            )
        for info in entries:
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise AdapterError(
                    f"the archive entry {_cut(repr(info.filename))} is a link or a special file",
                    param="archive",
                )
            name = members.wanted(info.filename)
            if name is None or info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise AdapterError("encrypted archives are not accepted", param="archive")
            if info.compress_type not in ZIP_METHODS:
                raise AdapterError(
                    f"the archive entry {_cut(repr(info.filename))} uses compression method "
                    f"{info.compress_type}; only stored (0) and deflate (8) are accepted",
                    param="archive",
                )
            limit = _limit(name, limits)
            check_size(info.file_size, limit, name, _param(name))  # declared, before reading
            # zipfile inflates at most what is asked for (deflate only: its bzip2 and lzma
            # readers do not bound their output), keeps the declared size's worth and checks
            # the CRC: a member that inflates to more than it declares goes no further.
            with archive.open(info) as f:
                content = f.read(info.file_size)
            members.add(name, info.filename, content)
    return members.result()


def _check_zip_directory(data: bytes) -> None:
    """Refuse a central directory too large to parse cheaply (millions of tiny entries)
    before ``zipfile`` builds an object per entry."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - (1 << 16) - 22))
    if end < 0 or end + 22 > len(data):
        raise zipfile.BadZipFile("no end of central directory record")
    (directory_size,) = struct.unpack_from("<I", data, end + 12)
    if directory_size == 0xFFFFFFFF or directory_size > MAX_ZIP_DIRECTORY_BYTES:
        raise AdapterError("the archive's directory is too large (zip64?)", param="archive")


# -- tar.gz


class _Inflater:
    """A read-only stream of a (possibly multi-member) gzip file's content, inflated on
    demand; refuses to produce more than ``budget`` bytes in all."""

    STEP = 8192  # compressed bytes per inflate call: at most ~8 MiB out (deflate's ratio <= 1032)

    def __init__(self, data: bytes, budget: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._z = zlib.decompressobj(wbits=31)
        self._members = 1
        self._ended = False
        self._buf = bytearray()
        self.budget = budget
        self.produced = 0

    def read(self, size: int) -> bytes:
        while len(self._buf) < size and self._inflate():
            pass
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out

    def drain(self) -> None:
        """Inflate the rest (to verify the checksums and the budget), keeping nothing."""
        self._buf.clear()
        while self._inflate():
            self._buf.clear()

    def _inflate(self) -> bool:
        """Inflate one step into the buffer; False at the end of the last gzip member."""
        if self._ended:
            return False
        if self._z.eof:
            self._pos -= len(self._z.unused_data)  # what followed the member that ended
            rest = self._data[self._pos :]
            if not rest or rest[0] == 0:  # zero padding after gzip data is allowed, as in gzip
                if rest.tobytes().strip(b"\0"):
                    raise EOFError("the gzip stream has garbage after zero padding")
                self._ended = True
                return False
            self._members += 1
            if self._members > MAX_GZIP_MEMBERS:
                raise AdapterError(
                    f"the archive has over {MAX_GZIP_MEMBERS} gzip members", param="archive"
                )
            self._z = zlib.decompressobj(wbits=31)
        if self._pos >= len(self._data):
            raise EOFError("the gzip stream is truncated")
        step = self._data[self._pos : self._pos + self.STEP]
        self._pos += len(step)
        out = self._z.decompress(step)
        self.produced += len(out)
        if self.produced > self.budget:
            raise AdapterTooLargeError(
                f"the archive decompresses to over {self.budget} bytes", param="archive"
            )
        self._buf += out
        return True


_TAR_META_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses an oversized pax or GNU long-name header before tarfile reads it whole into
    memory (``_proc_member`` is tarfile's documented hook for TarInfo subclasses)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_META_TYPES and self.size > MAX_TAR_META_BYTES:
            raise AdapterError(
                f"the archive has a {self.size}-byte extended header; the limit is "
                f"{MAX_TAR_META_BYTES}",
                param="archive",
            )
        # typeshed omits TarInfo._proc_member (tarfile's hook for subclasses).
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member


def _from_tar(data: bytes, limits: AdapterLimits) -> tuple[bytes, bytes]:
    stream = _Inflater(data, archive_budget(limits))
    members = _Members()
    # typeshed wants a file object that can also write, tell and seek; a "r|" stream only reads.
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as archive:  # type: ignore[call-overload]
        for count, member in enumerate(archive, start=1):
            if count > MAX_ENTRIES:
                raise AdapterError(f"the archive has over {MAX_ENTRIES} entries", param="archive")
            if not (member.isfile() or member.isdir()):
                raise AdapterError(
                    f"the archive entry {_cut(repr(member.name))} is a link or a special file",
                    param="archive",
                )
            if stream.produced + member.size > stream.budget:  # declared, before inflating it
                raise AdapterTooLargeError(
                    f"the archive entry {_cut(repr(member.name))} declares {member.size} bytes; "
                    f"the archive may decompress to at most {stream.budget} bytes",
                    param="archive",
                )
            name = members.wanted(member.name)
            if name is None or member.isdir():
                continue
            limit = _limit(name, limits)
            check_size(member.size, limit, name, _param(name))
            f = archive.extractfile(member)
            assert f is not None  # a regular file
            # Exactly the declared size (checked above): a buffered read(n) allocates n bytes
            # up front, and tarfile never gives more than the header declares.
            content = f.read(member.size)
            members.add(name, member.name, content)
    stream.drain()
    return members.result()
