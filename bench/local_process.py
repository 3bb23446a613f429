"""What the throwaway servers of the tests and benchmarks (redis-server, the S3 server, nginx)
have in common: a child process that a test can pause, crash or stop, and a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalProcess:
    """A server child process, ``self.proc`` while it runs (subclasses start it)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets open (connections are accepted by the
        kernel) but answers nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash: connections are refused from now on, and only what the server
        had made durable survives."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (after resuming it), SIGKILL if it has not exited within 5 s."""
        if self.proc is None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
