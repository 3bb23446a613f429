"""Timing side channels. An API key is hashed and looked up by its SHA-256, so how many leading
bytes of a wrong key match a real one does not change how long the check takes; another
tenant's adapter answers exactly like a missing one (status, body bytes, headers) and in the
same time, because the registry is only ever asked for (caller's tenant, name).

Timing tests sample every class in a fresh random order each round (drift and bursts of load
on a shared machine hit all classes alike) and compare medians with a tolerance: they decide
which *class* the code is in (constant-time or not), not a number."""

from __future__ import annotations

import hashlib
import random
import secrets
import statistics
import time
from collections.abc import Callable

import httpx
from http_helpers import TINY_ID, files_of, upload
from report import record, scale

from bench.peft_adapters import make_prefix_tuning
from server.config import ApiKeys

# Medians of classes that take the same path differ by noise only (up to 11% seen over HTTP
# with a load average of 6 on 2 cores). 25% is far below the gap of the in-process control (a
# plain == compare: 6x), and over HTTP it catches 0.3 ms of extra work on a ~1 ms request (an
# injected sleep on the foreign-adapter path fails the test at ratios of 1.5-1.6).
TOLERANCE = 1.25


def interleaved(
    samplers: dict[str, Callable[[], object]], rounds: int, burst: int = 3
) -> dict[str, float]:
    """Median seconds per call of each sampler. A round takes one sample of every sampler, in
    a fresh random order; a sample is the fastest of ``burst`` calls in a row, which drops
    most of the time the process spent descheduled (a machine shared by busy processes adds
    milliseconds to a call at random) and keeps the cost of the code path."""
    rng = random.Random(0)
    times: dict[str, list[int]] = {k: [] for k in samplers}
    order = list(samplers)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            best = None
            for _ in range(burst):
                start = time.perf_counter_ns()
                samplers[k]()
                took = time.perf_counter_ns() - start
                best = took if best is None else min(best, took)
            times[k].append(best)
    return {k: statistics.median(v) / 1e9 for k, v in times.items()}


def ratio(medians: dict[str, float]) -> float:
    return max(medians.values()) / min(medians.values())


def near_misses(key: str) -> dict[str, str]:
    """Wrong keys of ``key``'s length that share none, half, or all but the last of its
    characters."""

    def other(c: str) -> str:
        return "A" if c != "A" else "B"

    n = len(key)
    return {
        "prefix_0": other(key[0]) + key[1:][::-1],
        "prefix_half": key[: n // 2] + other(key[n // 2]) + key[n // 2 + 1 :][::-1],
        "prefix_all_but_1": key[:-1] + other(key[-1]),
    }


def test_api_key_lookup_time_ignores_matching_prefix():
    """In process, with 64 KiB keys to magnify any per-byte cost: ``ApiKeys.lookup`` of wrong
    keys sharing 0, half or all but one leading bytes with the real key takes the same time;
    a plain ``==`` against the raw key (the control) is told apart by the same statistic."""
    real = secrets.token_urlsafe(48 << 10)[: 64 << 10]
    keys = ApiKeys.from_entries([(real, "acme", False), (secrets.token_urlsafe(64), "b", False)])
    wrong = near_misses(real)
    assert keys.lookup(real).tenant == "acme"
    assert all(keys.lookup(k) is None for k in wrong.values())
    rounds = scale(400, 3000)
    lookup = interleaved({c: (lambda k=k: keys.lookup(k)) for c, k in wrong.items()}, rounds)
    leaky = interleaved({c: (lambda k=k: k == real) for c, k in wrong.items()}, rounds)
    assert ratio(leaky) > 2 * TOLERANCE, leaky  # the statistic sees a byte-by-byte compare
    assert ratio(lookup) < TOLERANCE, lookup
    record(
        "timing: API key lookup",
        f"{rounds} interleaved rounds of wrong 64 KiB keys sharing 0, half, all-but-1 leading "
        "bytes with a real key; control: == on the raw key",
        f"median spread under {TOLERANCE}x (the control's is far over it)",
        {
            **{f"lookup_{c}_us": m * 1e6 for c, m in lookup.items()},
            "lookup_ratio": ratio(lookup),
            **{f"control_{c}_us": m * 1e6 for c, m in leaky.items()},
            "control_ratio": ratio(leaky),
        },
    )


def test_api_key_check_over_http_ignores_matching_prefix(make_server, tiny_llm):
    """End to end: wrong keys that share 0, half or all but one characters with a real key
    get byte-identical 401s in the same time."""
    keys = {"acme": "sk-" + secrets.token_hex(24), "globex": "sk-" + secrets.token_hex(24)}
    server = make_server(tiny_llm, keys=keys)
    wrong = near_misses(keys["acme"])
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http:

        def get(key: str) -> httpx.Response:
            return http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})

        assert get(keys["acme"]).status_code == 200
        answers = {c: get(k) for c, k in wrong.items()}
        assert {r.status_code for r in answers.values()} == {401}
        assert len({r.content for r in answers.values()}) == 1
        rounds = scale(150, 1000)
        medians = interleaved({c: (lambda k=k: get(k)) for c, k in wrong.items()}, rounds)
    assert ratio(medians) < TOLERANCE, medians
    record(
        "timing: API key check over HTTP",
        f"{rounds} interleaved rounds of GET /v1/models with wrong keys sharing 0, half, "
        "all-but-1 leading characters with a real 51-character key",
        f"identical 401 bodies; median spread under {TOLERANCE}x",
        {**{f"{c}_ms": m * 1e3 for c, m in medians.items()}, "ratio": ratio(medians)},
    )


def routes(name: str) -> dict[str, tuple[str, str, dict | None]]:
    """Every way to name an adapter: (method, path, JSON body)."""
    chat = [{"role": "user", "content": "hi"}]
    return {
        "get": ("GET", f"/v1/adapters/{name}", None),
        "delete": ("DELETE", f"/v1/adapters/{name}", None),
        "completion_model": ("POST", "/v1/completions", {"model": name, "prompt": "hi"}),
        "completion_adapters": (
            "POST",
            "/v1/completions",
            {"model": TINY_ID, "adapters": [name], "prompt": "hi"},
        ),
        "completion_stream": (
            "POST",
            "/v1/completions",
            {"model": name, "prompt": "hi", "stream": True},
        ),
        "chat_model": ("POST", "/v1/chat/completions", {"model": name, "messages": chat}),
        "chat_adapters": (
            "POST",
            "/v1/chat/completions",
            {"model": TINY_ID, "adapters": [name], "messages": chat},
        ),
    }


def send(http: httpx.Client, route: tuple[str, str, dict | None]) -> httpx.Response:
    method, path, body = route
    return http.request(method, path, json=body)


def headers_of(r: httpx.Response) -> list[tuple[str, str]]:
    """Response headers but the date and the request id, which differ on every answer."""
    return [(k, v) for k, v in r.headers.multi_items() if k not in ("date", "x-request-id")]


def test_foreign_adapter_is_indistinguishable_from_missing(
    make_server, tiny_llm, tiny_ref, tmp_path
):
    """Globex naming acme's adapter, on every route that takes an adapter name, gets what it
    gets for a name that exists nowhere: 404, the same bytes, the same headers, in the same
    time; acme's adapter survives globex's DELETEs."""
    server = make_server(tiny_llm)
    acme, globex = server.http("acme"), server.http("globex")
    adapter = make_prefix_tuning(tiny_ref, tmp_path / "persona", 8, seed=5)
    name, absent = "persona", "personx"  # same length: bodies differ in the name only

    missing = {k: send(globex, r) for k, r in routes(name).items()}
    assert upload(acme, name, **files_of(adapter)).status_code == 201
    foreign = {k: send(globex, r) for k, r in routes(name).items()}
    for route in missing:
        m, f = missing[route], foreign[route]
        assert m.status_code == f.status_code == 404, (route, f.text)
        assert m.content == f.content, route
        assert headers_of(m) == headers_of(f), route
        assert f.json()["error"]["code"] in ("adapter_not_found", "model_not_found")
        assert name in f.json()["error"]["message"]

    samplers = {}
    for cls, which in (("foreign", name), ("missing", absent)):
        for route, r in routes(which).items():
            samplers[f"{route}/{cls}"] = lambda r=r: send(globex, r)
    first = {k: f() for k, f in samplers.items()}
    for route in routes(name):
        f, m = first[f"{route}/foreign"], first[f"{route}/missing"]
        assert f.status_code == m.status_code == 404
        assert f.content == m.content.replace(absent.encode(), name.encode()), route
    rounds = scale(100, 600)
    medians = interleaved(samplers, rounds)
    ratios = {
        route: medians[f"{route}/foreign"] / medians[f"{route}/missing"] for route in routes(name)
    }
    assert all(1 / TOLERANCE < x < TOLERANCE for x in ratios.values()), (ratios, medians)
    assert acme.get(f"/v1/adapters/{name}").json()["version"] == 1  # untouched by globex
    acme.close()
    globex.close()
    record(
        "timing: foreign adapter = missing adapter",
        f"{len(ratios)} routes naming an adapter (get, delete, completions model/adapters/"
        f"stream, chat model/adapters), {rounds} interleaved rounds of another tenant's "
        "adapter vs a name that exists nowhere",
        "404 with identical bytes and headers (but date, request id); median ratio within "
        f"{TOLERANCE}x per route",
        {
            **{f"{k}_ms": v * 1e3 for k, v in medians.items()},
            **{f"ratio_{k}": v for k, v in ratios.items()},
        },
    )


def test_key_table_holds_digests_only():
    """The key table holds digests only: no raw key stays in memory to be compared."""
    key = "sk-" + secrets.token_hex(24)
    keys = ApiKeys.from_entries([(key, "acme", False)])
    assert list(keys.by_digest) == [hashlib.sha256(key.encode()).hexdigest()]
    assert key not in repr(keys)
