"""A throwaway nginx in front of local prefix-serve replicas, for the scale-out tests
(tests/scaleout). Tooling: part of the ``prefix-serve-bench`` distribution, never of the
server.

It runs the deployment's own routing, ``deploy/nginx/prefix-serve.conf``, rendered into a
temporary directory: the ``server`` lines of its upstreams become the given replica
addresses (keeping their parameters), ``listen 80`` becomes a free loopback port, and a small
main configuration around it keeps the pid file, logs and temporary files in that directory,
so nginx needs neither root nor port 80. Two things are added for the tests only: the access
log (JSON lines with the upstreams tried) and an ``X-Upstream-Addr`` response header naming
the replicas that were tried, in order (nginx's ``$upstream_addr``).

The binary is ``nginx`` from PATH (the Debian package; ``make tools`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.local_process import free_port

DEPLOY_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "prefix-serve.conf"
UPSTREAM_HEADER = "x-upstream-addr"

_MAIN = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
{user}
events {{ worker_connections 1024; }}

http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    log_format replicas escape=json '{{"time":"$time_iso8601","method":"$request_method",'
        '"uri":"$request_uri","adapter":"$http_x_adapter","status":$status,'
        '"upstream":"$upstream_addr","upstream_status":"$upstream_status",'
        '"request_time":$request_time}}';
    access_log {dir}/access.log replicas;
    add_header X-Upstream-Addr $upstream_addr always;

    include {dir}/prefix-serve.conf;
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def render(conf: str, replicas: list[str], port: int) -> str:
    """``conf`` with every upstream's ``server`` lines replaced by ``replicas`` (each with the
    parameters of the block's first server line) and ``listen 80;`` by a loopback port."""

    def upstream(match: re.Match[str]) -> str:
        head, body = match.group(1), match.group(2)
        servers = re.findall(r"^\s*server\s+\S+([^;]*);", body, re.M)
        assert servers, f"upstream without servers: {head!r}"
        kept = re.sub(r"^\s*server\s+[^;]*;\n", "", body, flags=re.M)
        lines = "".join(f"    server {r}{servers[0]};\n" for r in replicas)
        return f"{head}{kept}{lines}}}"

    out, count = re.subn(r"(upstream\s+\w+\s*\{)([^}]*)\}", upstream, conf)
    assert count >= 1, "no upstream block in the nginx configuration"
    out, listens = re.subn(r"^(\s*)listen\s+80;", rf"\1listen 127.0.0.1:{port};", out, flags=re.M)
    assert listens == 1, "expected exactly one `listen 80;`"
    return out


class LocalNginx:
    """nginx on a free loopback port in front of ``replicas`` (``host:port`` strings, in the
    order of the upstream blocks: their names place them on the hash ring).

    ``start``/``stop``; ``reload(replicas)`` re-renders and reloads gracefully (SIGHUP: old
    workers finish their requests); ``access_log()`` returns the parsed lines."""

    def __init__(
        self, replicas: list[str], conf: Path = DEPLOY_CONF, binary: str | None = None
    ) -> None:
        self.binary = binary or find_nginx()
        if self.binary is None:
            raise FileNotFoundError("no nginx binary: run `make tools` (Debian package nginx)")
        self.conf = conf
        self.replicas = list(replicas)
        self.dir = Path(tempfile.mkdtemp(prefix="prefix-serve-nginx-"))
        self.dir.chmod(0o755)  # workers run as nobody when started by root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write(self) -> None:
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(_MAIN.format(dir=self.dir, user=user))
        rendered = render(self.conf.read_text(), self.replicas, self.port)
        (self.dir / "prefix-serve.conf").write_text(rendered)

    def test_config(self) -> None:
        """``nginx -t`` on the rendered configuration (raises with nginx's message)."""
        self._write()
        done = subprocess.run(
            [self.binary, "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{done.stderr}")

    def start(self, timeout_s: float = 10.0) -> LocalNginx:
        self.test_config()
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "stderr.log").open("ab"),
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start:\n{self.errors()}") from None
                time.sleep(0.02)

    def reload(self, replicas: list[str] | None = None) -> None:
        """Re-render (with new ``replicas`` if given) and reload without dropping requests."""
        assert self.proc is not None
        if replicas is not None:
            self.replicas = list(replicas)
        self.test_config()
        self.proc.send_signal(signal.SIGHUP)

    def errors(self) -> str:
        text = ""
        for name in ("error.log", "stderr.log"):
            path = self.dir / name
            if path.is_file():
                text += path.read_text(errors="replace")[-3000:]
        return text

    def access_log(self) -> list[dict]:
        path = self.dir / "access.log"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self, keep: bool = False) -> None:
        """SIGQUIT (graceful), SIGKILL after 10 s; the directory is removed unless ``keep``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
