"""Fault injection for ``test_faults.py``: the blob directory made full or read-only by real
mechanisms, an upload sent slowly over a raw socket (so that a kill lands inside it), and an
offline look at a data directory's blobs and registry."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from reliability_helpers import ServeProcess

from adapters_store.blobs import SUFFIX, LocalBlobStore
from adapters_store.codec import decode
from adapters_store.types import BlobError

# -- what is on disk


def blob_files(root: Path) -> dict[str, int]:
    """sha256 -> size of every blob under a blob root's ``objects/``."""
    return {
        p.name.removesuffix(SUFFIX): p.stat().st_size
        for p in (root / "objects").glob(f"*/*{SUFFIX}")
    }


def leftovers(root: Path) -> list[str]:
    """Files a writer or collector left in ``tmp/`` and ``trash/`` (names relative to root)."""
    return sorted(str(p.relative_to(root)) for d in ("tmp", "trash") for p in (root / d).iterdir())


def blob_verifies(root: Path, sha: str) -> bool:
    """True if blob ``sha`` exists and decodes to content hashing to ``sha``."""
    try:
        decode(LocalBlobStore(root).read(sha), sha)
    except BlobError:
        return False
    return True


# -- a slow upload over a raw socket


@dataclass
class SlowUpload:
    """A multipart ``POST /v1/adapters`` sent in ``pieces`` slices ``gap_s`` apart over a raw
    socket (``Connection: close``), in a thread: the caller can kill the server at a chosen
    moment of the upload. ``status`` is the HTTP status read back, None if the connection
    ended without one (the server died)."""

    port: int
    key: str
    name: str
    config: bytes
    weights: bytes
    pieces: int = 8
    gap_s: float = 0.02
    started: float = 0.0
    sent_at: float | None = None  # monotonic time the last byte went out
    answered_at: float | None = None
    status: int | None = None
    reply: bytes = b""
    sent_all: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def body_s(self) -> float:
        """How long sending the body takes, by construction."""
        return (self.pieces - 1) * self.gap_s

    def start(self) -> SlowUpload:
        request = httpx.Request(
            "POST",
            f"http://127.0.0.1:{self.port}/v1/adapters",
            data={"name": self.name},
            files={
                "config": ("adapter_config.json", self.config, "application/json"),
                "weights": ("adapter_model.safetensors", self.weights, "application/octet-stream"),
            },
        )
        body = request.read()
        head = (
            f"POST /v1/adapters HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {self.key}\r\n"
            f"Content-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self._thread = threading.Thread(target=self._run, args=(head, body), daemon=True)
        self.started = time.monotonic()
        self._thread.start()
        return self

    def join(self, timeout: float = 60.0) -> SlowUpload:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "upload client hung"
        return self

    def _run(self, head: bytes, body: bytes) -> None:
        step = -(-len(body) // self.pieces)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                sock.sendall(head)
                for i in range(self.pieces):
                    if i:
                        time.sleep(self.gap_s)
                    sock.sendall(body[i * step : (i + 1) * step])
                self.sent_at = time.monotonic()
                self.sent_all.set()
                while chunk := sock.recv(65536):
                    self.reply += chunk  # kept if the connection is reset after a status line
        except OSError:  # reset or broken pipe: the server died under us
            pass
        finally:
            self.sent_all.set()
        self.answered_at = time.monotonic()
        line = self.reply.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit():
            self.status = int(line[1])


# -- a blob directory that can be made full or read-only


def _privileged(*args: str) -> list[str] | None:
    """``args`` as root: directly when root, through passwordless sudo otherwise."""
    if os.geteuid() == 0:
        return list(args)
    if shutil.which("sudo"):
        return ["sudo", "-n", *args]
    return None


def _run(cmd: list[str] | None) -> str | None:
    """Run; None on success, else why it failed."""
    if cmd is None:
        return "not root and no sudo"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except OSError as exc:  # no such program
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


_NO_DAC = "-dac_override,-dac_read_search"


class BlobVolume:
    """The server's blob root (``--blob-url file://PATH``), made full or read-only by real
    mechanisms, chosen by what this machine allows:

    - full: a tmpfs of ``size`` bytes mounted on PATH when mounting is permitted (root with
      CAP_SYS_ADMIN, or passwordless sudo), filled by a file that takes all but ``headroom``
      bytes (ENOSPC); otherwise RLIMIT_FSIZE of the server process lowered to ``headroom``
      with prlimit(2) (EFBIG: any write past that size fails, as with a full disk or quota);
    - read-only, ``"remount_ro"``: that tmpfs remounted read-only (EROFS);
    - read-only, ``"chmod"``: write permission removed from the blob directories (EACCES). Root
      bypasses permission bits (CAP_DAC_OVERRIDE), so a root server is started through
      ``server_prefix`` (setpriv dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), as in a
      hardened container; ``unavailable(how)`` says why a mechanism cannot be used here.
    """

    def __init__(self, path: Path, size: int = 4 << 20) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.mount_error = _run(
            _privileged("mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path))
        )
        self.mounted = self.mount_error is None
        self.full_by = "tmpfs" if self.mounted else "rlimit_fsize"
        self.server_prefix: list[str] = []
        self._chmod_error: str | None = None
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            prefix = [setpriv or "setpriv", f"--inh-caps={_NO_DAC}", f"--bounding-set={_NO_DAC}"]
            self._chmod_error = _run([*prefix, "true"]) if setpriv else "no setpriv"
            self.server_prefix = [] if self._chmod_error else [*prefix, "--"]
        self._filler = path / "filler"
        self._fsize: tuple[int, int] | None = None
        self._modes: dict[Path, int] = {}

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    def unavailable(self, how: str) -> str | None:
        if how == "remount_ro" and not self.mounted:
            return f"mounting a tmpfs was refused ({self.mount_error})"
        if how == "chmod" and self._chmod_error:
            return (
                "running as root, where permission bits do not stop writes, and dropping "
                f"CAP_DAC_OVERRIDE from the server with setpriv failed ({self._chmod_error})"
            )
        return None

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def make_full(self, server_pid: int, headroom: int) -> None:
        """Leave ``headroom`` bytes (tmpfs: rounded to pages) for any file the server writes."""
        if not self.mounted:
            self._fsize = resource.prlimit(server_pid, resource.RLIMIT_FSIZE)
            resource.prlimit(server_pid, resource.RLIMIT_FSIZE, (headroom, self._fsize[1]))
            return
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        chunk = b"\0" * (1 << 16)
        try:
            while True:
                os.write(fd, chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)
        os.truncate(self._filler, max(0, self._filler.stat().st_size - headroom))

    def make_roomy(self, server_pid: int) -> None:
        if self._fsize is not None:
            resource.prlimit(server_pid, resource.RLIMIT_FSIZE, self._fsize)
            self._fsize = None
        self._filler.unlink(missing_ok=True)

    def make_read_only(self, how: str) -> None:
        assert self.unavailable(how) is None, self.unavailable(how)
        if how == "remount_ro":
            error = _run(_privileged("mount", "-o", "remount,ro", str(self.path)))
            assert error is None, f"remount read-only failed: {error}"
            return
        objects = self.path / "objects"
        for d in (self.path / "tmp", self.path / "trash", objects, *objects.iterdir()):
            self._modes[d] = d.stat().st_mode & 0o7777
            d.chmod(0o555)

    def make_writable(self) -> None:
        """Undo ``make_read_only``, whichever way it was done."""
        if self.mounted and "ro" in _mount_options(self.path):
            error = _run(_privileged("mount", "-o", "remount,rw", str(self.path)))
            assert error is None, f"remount read-write failed: {error}"
        for d, mode in self._modes.items():
            d.chmod(mode)
        self._modes.clear()

    def close(self) -> None:
        with contextlib.suppress(OSError, AssertionError):
            self.make_writable()
        if self.mounted:
            _run(_privileged("umount", "-l", str(self.path)))
            self.mounted = False


def _mount_options(path: Path) -> set[str]:
    """The options of the mount at exactly ``path`` (empty if none)."""
    options: set[str] = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1] == str(path):
            options = set(fields[3].split(","))  # the last one mounted there is the one seen
    return options


class PrefixedServe(ServeProcess):
    """A ``ServeProcess`` whose command runs through ``prefix`` (which must exec it, keeping
    the pid: signals and prlimit reach the server itself)."""

    def __init__(self, *args, prefix: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix

    def start(self, timeout: float = 120.0) -> PrefixedServe:
        log = (self.work / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "server.cli", "serve"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout)
        return self
