"""Three real ``prefix-serve serve`` replicas sharing one redis-server and one blob location,
behind a real nginx running ``deploy/nginx/prefix-serve.conf`` (``bench/local_nginx.py``), and
a client that records every request it sends through the proxy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from http_helpers import KEYS
from reliability_helpers import ServeProcess

from bench.capacity import Ring
from bench.local_nginx import UPSTREAM_HEADER, LocalNginx
from bench.local_redis import LocalRedis

HITS, QUERIES = "prefix_serve_prefix_cache_hits_total", "prefix_serve_prefix_cache_queries_total"


class Replica(ServeProcess):
    """A ``ServeProcess`` known by its address (``host:port``, as in nginx's upstreams)."""

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self) -> None:
        """Start without waiting for /ready (several replicas load their model at once)."""
        log = (self.work / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def cache_counters(self) -> tuple[int, int]:
        """(prefix-cache queries, hits) from /metrics: prompt positions, adapters' included."""
        m = self.metrics()
        return int(m[QUERIES]), int(m[HITS])


@dataclass
class Cluster:
    """``replicas`` behind ``nginx``; ``ring`` predicts which replica nginx picks."""

    redis: LocalRedis
    replicas: list[Replica]
    nginx: LocalNginx
    blob_url: str

    @property
    def ring(self) -> Ring:
        return Ring([r.addr for r in self.replicas])

    def by_addr(self, addr: str) -> Replica:
        return next(r for r in self.replicas if r.addr == addr)

    def http(self, tenant: str = "acme", **kw) -> httpx.Client:
        kw.setdefault("timeout", 120)
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
        return httpx.Client(base_url=self.nginx.url, headers=headers, trust_env=False, **kw)

    def counters(self) -> dict[str, tuple[int, int]]:
        return {r.addr: r.cache_counters() for r in self.replicas}

    def names_per_replica(self, per_replica: int, prefix: str) -> dict[str, list[str]]:
        """Adapter names ``prefix-0``, ``prefix-1``, … taken until every replica owns
        ``per_replica`` of them on the ring: replica address -> its names."""
        ring, owned = self.ring, {r.addr: [] for r in self.replicas}
        i = 0
        while min(len(v) for v in owned.values()) < per_replica:
            name = f"{prefix}-{i}"
            mine = owned[ring.lookup(name)]
            if len(mine) < per_replica:
                mine.append(name)
            i += 1
        return owned

    def stop(self) -> None:
        self.nginx.stop()
        for r in self.replicas:
            r.stop()
        self.redis.stop()


def start_cluster(
    model_dir: Path, work: Path, redis: LocalRedis, blob_url: str, env: dict[str, str]
) -> Cluster:
    redis.start()
    common = {
        "PREFIX_SERVE_REDIS_URL": redis.url,
        "PREFIX_SERVE_BLOB_URL": blob_url,
        "PREFIX_SERVE_TORCH_THREADS": "1",  # 3 replicas on a few shared cores
        "PREFIX_SERVE_KV_CACHE_MEMORY": "64MiB",
        "PREFIX_SERVE_DRAIN_TIMEOUT": "20",
        **env,
    }
    replicas = [Replica(model_dir, work / f"replica-{i}", KEYS, common) for i in range(3)]
    for r in replicas:
        r.launch()
    for r in replicas:
        r.wait_ready(180)
    nginx = LocalNginx([r.addr for r in replicas]).start()
    return Cluster(redis, replicas, nginx, blob_url)


def save_logs(cluster: Cluster, out: Path) -> None:
    """Keep nginx's logs beside the replicas' (the test's tmp dir) for a failure's post mortem."""
    for name in ("access.log", "error.log"):
        src = cluster.nginx.dir / name
        if src.is_file():
            shutil.copy(src, out / f"nginx-{name}")


def upload_text(http: httpx.Client, name: str, text: str, **kw) -> httpx.Response:
    return http.post("/v1/adapters", json={"name": name, "text": text}, **kw)


# -- a client that records every request


@dataclass
class Outcome:
    """One request through nginx: when it was sent and answered (monotonic), its status (or
    ``"transport"``), the replicas nginx tried (``X-Upstream-Addr``, in order), its usage and
    whether a stream ended complete (``[DONE]``)."""

    adapter: str
    stream: bool
    start: float
    end: float = 0.0
    status: int | str = 0
    upstreams: tuple[str, ...] = ()
    usage: dict = field(default_factory=dict)
    complete: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete

    @property
    def served_by(self) -> str | None:
        return self.upstreams[-1] if self.upstreams else None


def send(
    http: httpx.Client, adapter: str, prompt: str, max_tokens: int, stream: bool, header: bool
) -> Outcome:
    """One completion with ``adapter`` as its model (``X-Adapter`` set when ``header``)."""
    body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    out = Outcome(adapter, stream, time.monotonic())
    headers = {"X-Adapter": adapter} if header else {}
    try:
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            out.status = r.status_code
            out.upstreams = tuple(a for a in r.headers.get(UPSTREAM_HEADER, "").split(", ") if a)
            if not stream or r.status_code != 200:
                data = json.loads(r.read() or b"{}")
                out.usage = data.get("usage", {})
                out.complete = r.status_code == 200
                out.error = "" if out.complete else str(data)[:300]
            else:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        out.complete = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            out.error = line[:300]
                        out.usage = chunk.get("usage") or out.usage
    except httpx.HTTPError as exc:  # the proxy cut the stream, or the connection failed
        out.status = out.status or "transport"
        out.error = repr(exc)[:300]
    out.end = time.monotonic()
    return out


class Traffic:
    """``clients`` threads sending completions through nginx back to back until ``stop()``:
    client ``i`` cycles through ``adapters`` from ``i``, alternating streamed and plain
    requests, each with its ``X-Adapter`` header. Every request's ``Outcome`` is kept."""

    def __init__(self, cluster: Cluster, adapters: list[str], clients: int, max_tokens: int):
        self.cluster, self.adapters, self.max_tokens = cluster, adapters, max_tokens
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        with self.cluster.http(timeout=120) as http:
            n = 0
            while not self._stop.is_set():
                adapter = self.adapters[(i + n) % len(self.adapters)]
                prompt = f"Client {i} asks question {n} about"
                self.outcomes.append(send(http, adapter, prompt, self.max_tokens, n % 2 == 1, True))
                n += 1

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for f in self._futures:
            f.result(timeout=180)
        self._pool.shutdown()
        return self.outcomes

    def wait_for(self, count: int, timeout: float | None = None) -> None:
        """Until ``count`` more requests than now have been answered (by default within 2 s
        a request, at least 2 minutes: shared CPUs can be slow, a hang is not)."""
        target = len(self.outcomes) + count
        deadline = time.monotonic() + (timeout or max(120.0, 2.0 * count))
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, "traffic stalled"
            time.sleep(0.05)


def summary(outcomes: list[Outcome]) -> dict:
    statuses = Counter(str(o.status) for o in outcomes)
    return {
        "requests": len(outcomes),
        "statuses": dict(statuses),
        "incomplete_streams": sum(1 for o in outcomes if o.status == 200 and not o.complete),
        "retried_by_nginx": sum(1 for o in outcomes if len(o.upstreams) > 1),
    }
