"""Issue 11, "one tenant cannot hurt another": holes an attacker with two tenants found in the
adapter routes, each shown closed over real HTTP (real uvicorn servers, a real ``prefix-serve
serve`` process for memory).

4. Concurrent large uploads are not each held in memory at once: the bytes of uploads being
   processed are bounded by a budget the whole server shares, so the peak RSS of a server
   receiving 6 concurrent uploads stays within a small margin of its peak for one.
5. The byte quota counts every stored version until it is collected (replaced and deleted ones
   included): re-uploading one name cannot store more than the quota; collection frees it.
6. Malformed JSON in a text-prefix upload (nesting past the recursion limit, lone UTF-16
   surrogates) answers 400, and the keep-alive connection goes on serving.
8. ``admin`` in the keys file: an admin key lists every tenant's usage, lists and deletes any
   tenant's adapters; any other key gets 403 there; the admin generates in its own namespace.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from http_helpers import KEYS, TINY_ID, LiveServer
from reliability_helpers import ServeProcess
from report import record, scale

from adapters_store.codec import encode
from adapters_store.formats import text_adapter
from adapters_store.store import AdapterStore, open_store
from adapters_store.types import Quota, TenantQuotas
from server.api import create_app, schemas
from server.api.admin import TenantList
from server.api.upload_budget import UploadBudget, UploadsBusy
from server.async_engine import AsyncEngine
from server.config import ApiKeys, ServeConfig

MIB = 1 << 20
ADMIN_KEY, ADMIN_TENANT = "key-ops", "ops"
# 144 MiB of weights: two of them do not fit together in the server's default upload memory
# budget (272 MiB, one maximal upload), so concurrent ones are processed one at a time.
UPLOAD_MIB = scale(144, 200)
CONCURRENT = 6
GRACE_S = 300.0


class Served:
    """An in-thread server whose keys include an admin (``ops``), and its store."""

    def __init__(self, server: LiveServer, store: AdapterStore) -> None:
        self.server, self.store = server, store

    def http(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.server.url, headers=headers, trust_env=False, timeout=60)


@pytest.fixture
def serve(tiny_llm, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """``serve(quota=None, clock=None)``: the tiny model behind acme's and globex's keys and an
    admin key; the store collects only when the test calls ``collect()``."""
    started: list[Served] = []

    def make(quota: Quota | None = None, clock: Callable[[], float] = time.time) -> Served:
        config = ServeConfig(data_dir=str(tmp_path / "data"))
        quotas = TenantQuotas(default=quota) if quota else None
        store = open_store(
            config.data_dir, quotas=quotas, gc_interval_s=None, gc_grace_s=GRACE_S, clock=clock
        )
        capacity = tiny_llm.engine.config.max_num_seqs + config.max_queued_requests
        engine = AsyncEngine(lambda: tiny_llm.served, capacity=capacity)
        keys = ApiKeys.from_entries(
            [(KEYS["acme"], "acme", False), (KEYS["globex"], "globex", False)]
            + [(ADMIN_KEY, ADMIN_TENANT, True)]
        )
        served = Served(LiveServer(create_app(engine, store, config, keys)).start(), store)
        started.append(served)
        return served

    yield make
    for served in started:
        served.server.stop()
        served.store.close()


def error_of(r: httpx.Response, status: int, code: str) -> dict:
    """The OpenAI error object of ``r``, after checking status, shape and code exactly."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


def text_upload(http: httpx.Client, name: str, text: str) -> httpx.Response:
    return http.post("/v1/adapters", json={"name": name, "text": text})


# -- 4. uploads held in memory concurrently


def _big_refused_upload(mib: int) -> tuple[bytes, bytes]:
    """A valid prefix-tuning config for the tiny model and a well-formed safetensors file of
    ``mib`` MiB whose one tensor has the wrong width: refused (400) only once parsed."""
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 512,
        "num_layers": 2,
        "num_attention_heads": 2,
        "token_dim": 32,
    }
    cols = mib * MIB // (512 * 4)
    header = {"prompt_embeddings": {"dtype": "F32", "shape": [512, cols], "data_offsets": [0, 0]}}
    header["prompt_embeddings"]["data_offsets"][1] = 512 * cols * 4
    raw = json.dumps(header).encode()
    return json.dumps(config).encode(), struct.pack("<Q", len(raw)) + raw + bytes(512 * cols * 4)


def _status_line(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def _uploads_peak(
    server: ServeProcess, files: tuple[bytes, bytes], n: int
) -> tuple[int, Counter, bool]:
    """Peak RSS of the server while ``n`` clients upload ``files`` at once, the statuses, and
    whether the peak is the kernel's high-water mark (reset first through ``clear_refs``) rather
    than the largest of samples taken every 5 ms (where resetting is not allowed)."""
    pid = server.proc.pid
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    sampled = [_status_line(pid)["VmRSS"]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            sampled.append(_status_line(pid)["VmRSS"])

    statuses: Counter = Counter()
    go = threading.Barrier(n)

    def client(i: int) -> None:
        with server.http("acme", timeout=300) as http:
            go.wait()
            r = http.post(
                "/v1/adapters",
                data={"name": f"big-{i}"},
                files={"config": files[0], "weights": files[1]},
            )
        statuses[r.status_code] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(600)
    done.set()
    sampler.join()
    peak = _status_line(pid)["VmHWM"] if exact else max(sampled)
    return max(peak, max(sampled)), statuses, exact


def test_concurrent_large_uploads_do_not_grow_peak_memory(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    files = _big_refused_upload(UPLOAD_MIB)
    server = ServeProcess(tiny_model_dir, tmp_path / "server", KEYS)
    try:
        server.start()
        small = _big_refused_upload(1)
        _uploads_peak(server, small, 2)  # warm-up: first-use allocations are not the upload's
        time.sleep(0.5)
        base = _status_line(server.proc.pid)["VmRSS"]
        one, one_statuses, exact = _uploads_peak(server, files, 1)
        time.sleep(0.5)
        base_many = _status_line(server.proc.pid)["VmRSS"]
        many, many_statuses, _ = _uploads_peak(server, files, CONCURRENT)
        with server.http("acme") as http:
            listed = http.get("/v1/adapters").json()["data"]
    finally:
        server.stop()
    growth_one, growth_many = one - base, many - base_many
    # Each upload is refused by validation (none turned away, none stored) and the peak for
    # six at once is the peak for one, within 25% of one upload's size and allocator noise.
    assert one_statuses == Counter({400: 1}) and many_statuses == Counter({400: CONCURRENT})
    assert listed == []
    assert growth_many <= growth_one + UPLOAD_MIB * MIB // 4 + 32 * MIB, (growth_one, growth_many)
    record(
        "hostile uploads: concurrent large uploads",
        f"{CONCURRENT} concurrent uploads of a {UPLOAD_MIB} MiB safetensors file (valid header, "
        "wrong shape: refused only once parsed) to a serve process, against one upload",
        "every upload 400; the peak RSS for 6 at once within 25% of an upload of the peak for "
        "one (the upload memory budget: one at a time)",
        {
            "upload_mib": UPLOAD_MIB,
            "concurrent": CONCURRENT,
            "rss_base_mib": round(base / MIB),
            "peak_growth_1_mib": round(growth_one / MIB),
            "peak_growth_6_mib": round(growth_many / MIB),
            "statuses_6": dict(many_statuses),
            "peak_by": "VmHWM" if exact else "sampling",
        },
    )


def test_an_upload_waits_for_its_share_then_gets_429(serve) -> None:
    """With the budget held (an upload parked behind a busy engine thread), another upload
    waits ``wait_s`` for its share, then is answered 429 with Retry-After; once the budget is
    free, uploads go through again."""
    served = serve()
    budget = UploadBudget(capacity=64 << 10, wait_s=0.5)
    served.server.ctx.uploads = budget  # before any upload: this app's budget
    files = _big_refused_upload(1)  # 1 MiB: more than the whole budget, so it runs alone
    statuses: dict[str, int] = {}

    def post(label: str) -> None:
        with served.http(KEYS["acme"]) as http:
            r = http.post(
                "/v1/adapters",
                data={"name": label},
                files={"config": files[0], "weights": files[1]},
            )
        statuses[label] = r.status_code

    busy = threading.Thread(
        target=lambda: served.server.engine.call_blocking(lambda _llm: time.sleep(3), 10)
    )
    busy.start()
    holder = threading.Thread(target=post, args=("holder",))
    holder.start()
    start = time.monotonic()
    while budget.held == 0:  # the holder has its lease and waits for the engine thread
        assert time.monotonic() - start < 10, "the first upload never took its lease"
        time.sleep(0.01)
    assert budget.held == budget.capacity
    with served.http(KEYS["globex"]) as globex:
        t = time.monotonic()
        r = globex.post(
            "/v1/adapters", data={"name": "waiter"}, files={"config": files[0], "weights": files[1]}
        )
        waited = time.monotonic() - t
        err = error_of(r, 429, UploadsBusy.code)
        assert err["type"] == "overloaded_error" and "waited 0.5 s" in err["message"]
        assert r.headers["retry-after"] == "5" and 0.5 <= waited < 2.5, waited
        busy.join()
        holder.join()
        assert statuses == {"holder": 400}  # refused by validation, once the engine was free
        assert budget.held == 0 and budget.peak == budget.capacity
        r = globex.post(
            "/v1/adapters", data={"name": "again"}, files={"config": files[0], "weights": files[1]}
        )
        error_of(r, 400, "invalid_adapter")
        assert globex.get("/v1/adapters").json()["data"] == []


def test_the_upload_budget_serves_the_tenant_holding_least_first() -> None:
    """One tenant's queue of uploads does not keep another's waiting: when bytes are freed,
    the waiter whose tenant holds the fewest goes first (then the oldest); a reservation over
    the capacity takes the whole budget; a cancelled waiter gives nothing back it did not
    have."""

    async def scenario() -> list[str]:
        budget = UploadBudget(capacity=10, wait_s=5)
        order: list[str] = []
        first = budget.lease("x")
        await first.acquire(10)

        async def wait(label: str, tenant: str, nbytes: int) -> None:
            lease = budget.lease(tenant)
            await lease.acquire(nbytes)
            order.append(f"{label}:{lease.held}")
            await asyncio.sleep(0.05)
            lease.shrink(0)

        tasks = [asyncio.create_task(wait(f"x{i}", "x", 5)) for i in (2, 3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(wait("y1", "y", 5)))
        cancelled = asyncio.create_task(wait("y2", "y", 50))  # clamped to 10
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert (budget.held, len(budget._waiters)) == (10, 3)
        first.shrink(0)  # x2 (x holds 0 and it is oldest), then y1 (y holds 0, x holds 5)
        await asyncio.gather(*tasks)
        assert (budget.held, budget.peak, budget._waiters) == (0, 10, [])
        return order

    assert asyncio.run(scenario()) == ["x2:5", "y1:5", "x3:5"]


# -- 5. the byte quota counts every stored version until it is collected


def test_byte_quota_counts_replaced_and_deleted_versions_until_collected(
    serve, store_clock
) -> None:
    texts = [f"You are assistant number {i:03d}." for i in range(8)]
    size = len(encode(text_adapter(texts[0])))  # every one of these texts is stored this big
    assert {len(encode(text_adapter(t))) for t in texts} == {size}
    clock = store_clock
    served = serve(quota=Quota(max_adapters=10, max_total_bytes=3 * size), clock=clock)
    store = served.store
    with served.http(KEYS["acme"]) as acme, served.http(KEYS["globex"]) as globex:
        for i in range(3):
            r = text_upload(acme, "x", texts[i])
            assert (r.status_code, r.json()["version"]) == (201, i + 1), r.text
        assert store.registry.usage("acme") == (1, 3 * size)
        # The two replaced versions still take their space: a fourth version does not fit.
        err = error_of(text_upload(acme, "x", texts[3]), 413, "quota_exceeded")
        assert err["type"] == "request_too_large"
        assert f"would store {4 * size} bytes" in err["message"]
        assert acme.get("/v1/adapters/x").json()["version"] == 3
        # Another tenant is not affected.
        assert text_upload(globex, "x", texts[3]).status_code == 201
        # Deleting hides, but the deleted versions count until they are collected.
        assert acme.delete("/v1/adapters/x").status_code == 200
        assert store.registry.usage("acme") == (0, 3 * size)
        error_of(text_upload(acme, "y", texts[4]), 413, "quota_exceeded")
        assert store.collect() == 0  # within the grace period: kept
        clock.now += GRACE_S + 1
        assert store.collect() == 3  # x's three blobs; globex's is live
        assert store.registry.usage("acme") == (0, 0)
        assert store.registry.usage("globex") == (1, size)
        # Collected: the space is free again, and once more only up to the quota.
        versions = [text_upload(acme, "x", texts[5 + i]).json().get("version") for i in range(3)]
        assert versions == [4, 5, 6]
        error_of(text_upload(acme, "x", texts[0]), 413, "quota_exceeded")
        assert store.registry.usage("acme") == (1, 3 * size)
    record(
        "hostile uploads: quota counts stored versions",
        "one name re-uploaded, then deleted, against a byte quota of 3 stored versions; the "
        "store collected after the grace period",
        "the 4th version and an upload after the delete 413 quota_exceeded; the other tenant "
        "unaffected; after collection 3 versions fit again, not 4",
        {
            "version_bytes": size,
            "quota_bytes": 3 * size,
            "accepted_before_collection": 3,
            "blobs_collected": 3,
            "accepted_after_collection": 3,
        },
    )


# -- 6. malformed JSON in a text-prefix upload


def _exchange(sock: socket.socket, method: str, path: str, body: bytes | None, key: str) -> tuple:
    """One HTTP/1.1 request on ``sock`` (kept alive) and its answer: (status, headers, body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    sock.sendall(head.encode() + b"\r\n" + (body or b""))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-answer"
        rest += chunk
    assert len(rest) == length  # nothing more: one answer per request
    return int(lines[0].split()[1]), headers, json.loads(rest)


def test_malformed_json_text_uploads_are_400_on_one_keep_alive_connection(serve) -> None:
    served = serve()
    deep = 100_000
    cases = [  # (what, body, code, param)
        (
            "arrays nested past the recursion limit",
            b'{"name": "deep", "text": ' + b"[" * deep + b"]" * deep + b"}",
            "invalid_json",
            None,  # the parser gave up inside: no field to name
        ),
        (
            "arrays nested 100 deep",
            b'{"name": "deep", "text": ' + b"[" * 100 + b"]" * 100 + b"}",
            "invalid_json",
            "text",
        ),
        (
            "a lone surrogate in the text",
            b'{"name": "s", "text": "hi \\ud800"}',
            "invalid_request",
            "text",
        ),
        (
            "a lone surrogate in the name",
            b'{"name": "\\udfff", "text": "hi"}',
            "invalid_request",
            "name",
        ),
        (
            "a lone surrogate in a key",
            b'{"\\ud800": 1, "name": "s", "text": "hi"}',
            "invalid_request",
            None,
        ),
    ]
    port = int(served.server.url.rsplit(":", 1)[1])
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for what, body, code, param in cases:
            status, headers, answer = _exchange(sock, "POST", "/v1/adapters", body, KEYS["acme"])
            assert status == 400, (what, answer)
            assert answer["error"]["type"] == "invalid_request_error", (what, answer)
            assert (answer["error"]["code"], answer["error"]["param"]) == (code, param), what
            assert headers.get("connection", "keep-alive") != "close", what
            answers.append(status)
        # The same connection goes on serving: nothing was stored, then a good upload works.
        status, _, listing = _exchange(sock, "GET", "/v1/adapters", None, KEYS["acme"])
        assert (status, listing) == (200, {"object": "list", "data": []})
        good = b'{"name": "s", "text": "Be brief."}'
        status, _, created = _exchange(sock, "POST", "/v1/adapters", good, KEYS["acme"])
        assert (status, created["name"], created["version"]) == (201, "s", 1)
    record(
        "hostile uploads: malformed JSON text prefixes",
        f"{len(cases)} malformed JSON bodies to POST /v1/adapters (arrays nested {deep} and 100 "
        "deep, lone surrogates in the text, the name and a key), then a listing and a valid "
        "upload, all on one keep-alive connection",
        "each 400 invalid_request_error with its code and param; the connection then served "
        "200 and 201",
        {"bodies": len(cases), "statuses": dict(Counter(answers)), "after": "200, 201"},
    )


# -- 8. admin keys


def test_admin_key_lists_every_tenant_and_manages_any_adapter(serve) -> None:
    served = serve()
    quota = Quota()  # the default quota of every tenant
    quota_object = {
        "max_adapters": quota.max_adapters,
        "max_total_bytes": quota.max_total_bytes,
        "max_virtual_tokens": quota.max_virtual_tokens,
        "max_upload_bytes": quota.max_upload_bytes,
    }
    with (
        served.http(KEYS["acme"]) as acme,
        served.http(KEYS["globex"]) as globex,
        served.http(ADMIN_KEY) as admin,
        served.http(None) as nobody,
    ):
        a = text_upload(acme, "a", "You are terse.").json()
        b = text_upload(acme, "b", "You are a pirate.").json()
        b2 = text_upload(acme, "b", "You are a polite pirate.").json()  # b's v1 now hidden
        g = text_upload(globex, "g", "You are globex's helper.").json()
        acme_stored = a["size_bytes"] + b["size_bytes"] + b2["size_bytes"]

        def tenant(name: str, adapters: int, stored: int) -> dict:
            return {
                "object": "tenant",
                "id": name,
                "adapters": adapters,
                "stored_bytes": stored,
                "quota": quota_object,
            }

        r = admin.get("/v1/admin/tenants")
        assert r.status_code == 200, r.text
        TenantList.model_validate(r.json())  # as /openapi.json documents it (no extra field)
        assert r.json() == {
            "object": "list",
            "data": [
                tenant("acme", 2, acme_stored),
                tenant("globex", 1, g["size_bytes"]),
                tenant(ADMIN_TENANT, 0, 0),
            ],
        }
        r = admin.get("/v1/admin/tenants/acme/adapters")
        assert r.status_code == 200, r.text
        schemas.AdapterList.model_validate(r.json())
        assert r.json() == {"object": "list", "data": [a, b2]}
        assert r.json() == acme.get("/v1/adapters").json()
        r = admin.get("/v1/admin/tenants/nobody-yet/adapters")
        assert (r.status_code, r.json()) == (200, {"object": "list", "data": []})

        # Other keys: 403 on every admin route, whoever's data it names; no key: 401.
        refused = 0
        for client in (acme, globex):
            for method, path in (
                ("GET", "/v1/admin/tenants"),
                ("GET", "/v1/admin/tenants/acme/adapters"),
                ("DELETE", "/v1/admin/tenants/acme/adapters/a"),
                ("DELETE", "/v1/admin/tenants/globex/adapters/g"),
            ):
                err = error_of(client.request(method, path), 403, "admin_required")
                assert err["type"] == "permission_error"
                refused += 1
        error_of(nobody.get("/v1/admin/tenants"), 401, "missing_api_key")
        assert acme.get("/v1/adapters/a").status_code == 200  # the refused delete did nothing

        # The admin deletes another tenant's adapter: hidden at once, bytes kept until collected.
        r = admin.delete("/v1/admin/tenants/acme/adapters/a")
        assert (r.status_code, r.json()) == (
            200,
            {"id": a["id"], "object": "adapter", "deleted": True},
        )
        error_of(acme.get("/v1/adapters/a"), 404, "adapter_not_found")
        error_of(admin.delete("/v1/admin/tenants/acme/adapters/a"), 404, "adapter_not_found")
        tenants = admin.get("/v1/admin/tenants").json()["data"]
        assert tenants[0] == tenant("acme", 1, acme_stored)
        error_of(admin.get("/v1/admin/tenants/a%20b/adapters"), 400, "invalid_tenant")

        # For generation the admin's namespace is its own: acme's adapters are not there.
        body = {"model": "b", "prompt": "Hi", "max_tokens": 2}
        error_of(admin.post("/v1/completions", json=body), 404, "model_not_found")
        assert admin.get("/v1/adapters").json() == {"object": "list", "data": []}
        r = admin.post("/v1/completions", json={**body, "model": TINY_ID})
        assert r.status_code == 200, r.text
    record(
        "hostile uploads: admin keys",
        "an admin key and two tenants' keys on the admin routes (tenant usage, a tenant's "
        "adapters, deleting one) and on generation",
        "the admin's listings exact (usage counts replaced versions); every other key 403 "
        "permission_error, no key 401; the admin's delete hides at once; the admin generates "
        "only in its own namespace",
        {"tenants_listed": 3, "non_admin_refusals": refused, "admin_deletes": 1},
    )
