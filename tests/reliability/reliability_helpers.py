"""A real ``prefix-serve serve`` process and a load generator of streaming clients, shared by
the reliability tests (a module of its own: ``conftest`` is ambiguous as an import name)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m server.cli serve`` on a free loopback port; configured by ``PREFIX_SERVE_*``
    variables (``env``), with ``keys`` ({tenant: key}) written to an API keys file. Its output
    goes to ``work/server.log``. ``stop()`` (SIGTERM, then SIGKILL) is always safe to call."""

    def __init__(
        self, model_dir: Path, work: Path, keys: dict[str, str], env: dict[str, str] | None = None
    ) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.keys = keys
        (work / "keys.json").write_text(
            json.dumps({"keys": [{"key": k, "tenant": t} for t, k in keys.items()]})
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PREFIX_SERVE_MODEL": str(model_dir),
            "PREFIX_SERVE_PORT": str(self.port),
            "PREFIX_SERVE_DATA_DIR": str(work / "data"),
            "PREFIX_SERVE_API_KEYS": str(work / "keys.json"),
            "PREFIX_SERVE_DEVICE": "cpu",
            "PREFIX_SERVE_DTYPE": "float32",
            "PREFIX_SERVE_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> ServeProcess:
        log = (self.work / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=5) as http:
            while True:
                assert self.proc.poll() is None, f"server exited:\n{self.log()}"
                try:
                    if http.get(self.url + "/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"server not ready:\n{self.log()}"
                time.sleep(0.1)

    def log(self) -> str:
        return (self.work / "server.log").read_text(errors="replace")[-4000:]

    def http(self, tenant: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        kw.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, headers=headers, trust_env=False, **kw)

    def rss_bytes(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) * 1024

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of ``/metrics`` (labelled ones keyed with their labels)."""
        with httpx.Client(trust_env=False, timeout=10) as http:
            text = http.get(self.url + "/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL past ``timeout``. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Target:
    """What one client sends: its key, a model (base id or adapter name), extra adapters."""

    key: str
    model: str
    adapters: tuple[str, ...] = ()


@dataclass
class LoadResult:
    """Outcomes of every request sent. ``statuses`` counts HTTP statuses (a transport error
    counts as ``"transport"``); ``broken`` counts 200 streams that ended without ``[DONE]``,
    ``stream_errors`` those that carried an error event; ``errors`` keeps a sample of the
    unexpected ones."""

    statuses: Counter = field(default_factory=Counter)
    broken: int = 0
    stream_errors: int = 0
    tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def unexpected(self, allowed: set = frozenset({200, 429})) -> dict:
        return {s: n for s, n in self.statuses.items() if s not in allowed}


async def _one(
    http: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int, out: LoadResult
) -> float:
    """One streamed request, counted in ``out``; returns the Retry-After of a 429, else 0."""
    body = {
        "model": target.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.adapters:
        body["adapters"] = list(target.adapters)
    start = time.perf_counter()
    try:
        async with http.stream(
            "POST",
            "/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {target.key}"},
        ) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                out.statuses[r.status_code] += 1
                if r.status_code != 429 and len(out.errors) < 20:
                    out.errors.append(f"{r.status_code}: {text[:300]}")
                return float(r.headers.get("retry-after", 0)) if r.status_code == 429 else 0.0
            done, first = False, True
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out.stream_errors += 1
                    if len(out.errors) < 20:
                        out.errors.append(f"stream error: {data[:300]}")
                if chunk.get("choices") and first:
                    out.ttfts.append(time.perf_counter() - start)
                    first = False
                if chunk.get("usage"):
                    out.tokens += chunk["usage"]["completion_tokens"]
            out.statuses[200] += 1
            if not done:
                out.broken += 1
    except httpx.TransportError as exc:
        out.statuses["transport"] += 1
        if len(out.errors) < 20:
            out.errors.append(f"transport: {exc!r}")
    return 0.0


async def run_load(
    url: str,
    targets: list[Target],
    clients: int,
    seconds: float,
    max_tokens: int = 16,
    stop: threading.Event | None = None,
) -> LoadResult:
    """``clients`` concurrent streaming clients, each sending requests back to back (client
    ``i`` cycles through ``targets`` from ``i``) for ``seconds`` or until ``stop`` is set.
    After a 429 a client waits what the server's ``Retry-After`` asks, as clients do."""
    out = LoadResult()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=120, limits=limits) as http:

        async def client(i: int) -> None:
            n = 0
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                target = targets[(i + n) % len(targets)]
                prompt = f"Client {i} request {n}: tell me about"
                retry_after = await _one(http, target, prompt, max_tokens, out)
                if retry_after:
                    await asyncio.sleep(retry_after)
                n += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    return out


class BackgroundLoad:
    """``run_load`` in a thread of its own (its own event loop), for tests that inject faults
    while it runs: ``with BackgroundLoad(...) as load: ...; load.result``."""

    def __init__(self, url: str, targets: list[Target], clients: int, max_tokens: int = 16):
        self.stop = threading.Event()
        self.result: LoadResult | None = None
        self._args = (url, targets, clients, 3600.0, max_tokens, self.stop)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.result = asyncio.run(run_load(*self._args))

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._thread.join(180)
        assert not self._thread.is_alive(), "load clients did not stop"
