"""The CPU's native kernels, built on first use, loaded with ctypes: the paged attention kernel
(``paged_attention.c``), the linear product (``linear.c``: float32, and bfloat16 where the
CPU has AVX512-BF16) and a layer's small operators (``layers.c``: RMSNorm, the SiLU gate,
the cache write).

The kernels are plain C files that need only libc, libm and OpenMP, so they are compiled on the
machine that runs them rather than shipped compiled: the first engine start runs the C compiler
(``$CC``, else ``cc``) once, with ``-O3 -march=native`` (this CPU's vector instructions), and
keeps the library under ``$PREFIX_SERVE_CACHE`` (default ``~/.cache/prefix-serve``), named by
a hash of the sources, the flags and the CPU's feature flags, so a changed kernel or another
CPU gets its own build. A build lands by atomic rename, so concurrent starts never load a
half-written file; the directory is created private to the user, and a library that another
user could have written or swapped (the file or its directory writable by others, or not
ours) is not loaded. Where there is no compiler or the build fails,
``load`` says why and the engine keeps torch's attention and the BLAS products
(``attention_backend`` and ``linear_backend`` "auto"); ``PREFIX_SERVE_NATIVE=0`` turns the
kernels off.

OpenMP comes from torch's own libgomp: torch is imported first, and the library names
libgomp by its soname, which the loader resolves to the copy already in the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("paged_attention.c", "linear.c", "layers.c")
)
# Included by the sources: part of the key.
HEADERS = tuple(Path(__file__).with_name(name) for name in ("bf16.h", "vec.h"))
FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120
# layers.c's RMSNorm, SiLU gate and rotary embedding: float32 by these names, bfloat16 with
# the suffix _bf16 (the same arguments, bfloat16 where the float32 ones take float32).
LAYER_KERNELS = ("rms_norm", "silu_gate", "rotate_heads")


class Job(ctypes.Structure):
    """The kernel's argument block (``Job`` in ``paged_attention.c``, field for field)."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("q_head_stride", ctypes.c_int64),
        ("q_row_stride", ctypes.c_int64),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("cache_head_stride", ctypes.c_int64),
        ("slots", ctypes.c_void_p),
        ("width", ctypes.c_int64),
        ("hidden", ctypes.c_void_p),
        ("hidden_unit_stride", ctypes.c_int64),
        ("hidden_query_stride", ctypes.c_int64),
        ("q_index", ctypes.c_void_p),
        ("dest", ctypes.c_void_p),
        ("q_len", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("out_head_stride", ctypes.c_int64),
        ("out_row_stride", ctypes.c_int64),
        ("lse", ctypes.c_void_p),
        ("lse_head_stride", ctypes.c_int64),
        ("units", ctypes.c_int64),
        ("q_heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("bf16", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


class LinearJob(ctypes.Structure):
    """The linear product's argument block (``LinearJob`` in ``linear.c``)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("x_stride", ctypes.c_int64),
        ("packed", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("y_stride", ctypes.c_int64),
        ("m", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("threads", ctypes.c_int32),
    ]


@dataclass(frozen=True)
class Kernel:
    """The loaded library, or why there is none (``lib`` None and ``reason`` set)."""

    lib: ctypes.CDLL | None
    reason: str = ""
    max_head_dim: int = 0
    panel_width: int = 0  # output columns per packed panel of the linear product
    bf16_linear: bool = False  # built with a bfloat16 product
    # That product widens bfloat16 to float32 (a CPU without AVX512-BF16) rather than
    # multiplying bfloat16 pairs.
    bf16_widens: bool = False


def cache_dir() -> Path:
    root = os.environ.get("PREFIX_SERVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "prefix-serve"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str, target: Path) -> str:
    """Compile SOURCES into ``target`` (atomically); returns "" or why it failed."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            return f"{compiler} failed: {done.stderr.strip()[-500:]}"
        os.replace(tmp, target)
        return ""
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{compiler} could not run: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _trusted(path: Path) -> str:
    """Why the library at ``path`` must not be loaded, or an empty string: it and its
    directory must be ours and writable by no one else (else another user could have put or
    swapped it there)."""
    for item in (path.parent, path):
        info = item.stat()
        if info.st_uid != os.getuid():
            return f"{item} belongs to another user"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{item} is writable by other users"
    return ""


@lru_cache(maxsize=1)
def load() -> Kernel:
    """Build (once per machine and source) and load the kernel; never raises."""
    if os.environ.get("PREFIX_SERVE_NATIVE", "1") == "0":
        return Kernel(None, "turned off by PREFIX_SERVE_NATIVE=0")
    name = os.environ.get("CC", "cc")
    compiler = shutil.which(name)
    if compiler is None:
        return Kernel(None, f"no C compiler ({name}) on PATH")
    key = hashlib.sha256(
        b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS))
        + " ".join(FLAGS).encode()
        + _cpu_flags().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    try:
        if not target.exists():
            log.info("building the CPU kernels into %s (once)", target)
            why = _build(compiler, target)
            if why:
                return Kernel(None, why)
        why = _trusted(target)
        if why:
            return Kernel(None, why)
        lib = ctypes.CDLL(str(target))
    except OSError as exc:  # the cache cannot be made, written or read; the library not loaded
        return Kernel(None, f"{target}: {exc}")
    lib.paged_attention.argtypes = [ctypes.POINTER(Job)]
    lib.paged_attention.restype = ctypes.c_int
    lib.paged_attention_job_size.restype = ctypes.c_int64
    lib.paged_attention_max_head_dim.restype = ctypes.c_int64
    lib.linear_product.argtypes = [ctypes.POINTER(LinearJob)]
    lib.linear_product.restype = None
    lib.linear_job_size.restype = ctypes.c_int64
    lib.linear_panel_width.restype = ctypes.c_int64
    lib.linear_product_bf16.argtypes = [ctypes.POINTER(LinearJob)]
    lib.linear_product_bf16.restype = None
    lib.linear_bf16_available.restype = ctypes.c_int
    lib.linear_bf16_widens.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in ("", "_bf16"):
        norm, gate, rotate = (getattr(lib, f"{n}{suffix}") for n in LAYER_KERNELS)
        norm.argtypes = [ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int32]
        gate.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ctypes.c_int32]
        rotate.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int32]
        norm.restype = gate.restype = rotate.restype = None
    lib.write_kv.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64]
    lib.write_kv.restype = i64
    if lib.paged_attention_job_size() != ctypes.sizeof(
        Job
    ) or lib.linear_job_size() != ctypes.sizeof(LinearJob):
        return Kernel(None, f"{target} was built for another argument layout")
    return Kernel(
        lib,
        max_head_dim=int(lib.paged_attention_max_head_dim()),
        panel_width=int(lib.linear_panel_width()),
        bf16_linear=bool(lib.linear_bf16_available()),
        bf16_widens=bool(lib.linear_bf16_widens()),
    )


def usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Why the kernel cannot serve a model on ``device`` in ``dtype`` with ``head_dim``, or
    an empty string where it can."""
    if device.type != "cpu":
        return f"the native attention kernel runs on the CPU only (model on {device.type})"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the native attention kernel takes float32 or bfloat16, not {dtype}"
    kernel = load()
    if kernel.lib is None:
        return f"the native attention kernel is not available: {kernel.reason}"
    if head_dim > kernel.max_head_dim:
        return f"the native attention kernel takes head dimensions up to {kernel.max_head_dim}"
    return ""


def has_matrix_unit() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 (oneDNN's products use them)."""
    return "amx_bf16" in _cpu_flags().split()


def linear_runner(job: LinearJob, bf16: bool = False) -> Callable[[], None]:
    """A call that runs the linear product (float32, or bfloat16) on ``job`` as its fields are
    at the time of the call (the caller sets the input, output and rows before each)."""
    kernel = load()
    assert kernel.lib is not None, "native.linear_runner needs a loaded kernel"
    assert kernel.bf16_linear or not bf16, "this build has no bfloat16 product"
    function = kernel.lib.linear_product_bf16 if bf16 else kernel.lib.linear_product
    ref = ctypes.byref(job)
    return lambda: function(ref)


def run(job: Job) -> None:
    lib = load().lib
    assert lib is not None, "native.run needs a loaded kernel (check usable())"
    status = lib.paged_attention(ctypes.byref(job))
    if status == 2:
        raise ValueError(
            f"paged attention kernel: head dimension {job.head_dim} (at most "
            f"{load().max_head_dim}), {job.q_heads} query heads over {job.kv_heads} kv heads"
        )
    if status != 0:
        raise MemoryError("paged attention kernel: out of memory for its working buffers")
