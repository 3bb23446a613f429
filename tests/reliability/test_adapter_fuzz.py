"""Hostile adapter uploads over real HTTP (``POST /v1/adapters``), built from valid PEFT
adapters saved with PEFT for the tiny model: broken safetensors files, configs, pickles,
unsafe archives, decompression bombs and wrong content types. Each must get its 4xx (docs/api.md:
400, 413, 415) in OpenAI's error shape with a message naming the problem, and leave the store
exactly as it was: both tenants' listings (HTTP and the store's own), every file under the
data directory, no temp file and no open file left. Variants that are valid get 201 and exactly
one new version. At full size (``PREFIX_SERVE_RELIABILITY=full``), seeded random mutations of
valid files too: each a 4xx or a 201 whose adapter then generates, never a 5xx."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
import tracemalloc
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import report
from adapter_fuzz_cases import (
    CASES,
    FILENAMES,
    KINDS,
    ROWS,
    SEEDED,
    VALID,
    Inputs,
    Req,
    arch,
    mp,
    zip_with,
)
from adapter_fuzz_inputs import MIB, header_of
from http_helpers import CONFIG, KEYS, WEIGHTS, LiveServer, error_of, tar_gz_of, zip_of

from adapters_store.store import open_store
from bench.peft_adapters import make_p_tuning, make_prefix_tuning, make_prompt_tuning
from server.api import create_app
from server.api.errors import ERROR_TYPES
from server.async_engine import AsyncEngine
from server.config import ApiKeys, ServeConfig


def send(http: httpx.Client, req: Req, name: str) -> httpx.Response:
    if req.content is not None:
        return http.post("/v1/adapters", content=req.content, headers=req.headers)
    return http.post("/v1/adapters", data={"name": name, **(req.fields or {})}, files=_files(req))


def _files(req: Req) -> list[tuple[str, tuple[str, bytes, str]]]:
    pairs = req.files.items() if isinstance(req.files, dict) else req.files
    return [
        (k, v if isinstance(v, tuple) else (FILENAMES.get(k, k), v, "application/octet-stream"))
        for k, v in pairs
    ]


def encoded(req: Req, name: str) -> tuple[bytes, str]:
    """The multipart body httpx sends for ``req``, and its content type."""
    request = httpx.Request("POST", "http://x/", data={"name": name}, files=_files(req))
    return request.read(), request.headers["content-type"]


@pytest.fixture(scope="module")
def inputs(tiny_ref, tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("fuzz-adapters")
    dirs = {
        "prefix": make_prefix_tuning(tiny_ref, root / "prefix", ROWS["prefix"], seed=1, scale=30),
        "prompt": make_prompt_tuning(tiny_ref, root / "prompt", ROWS["prompt"], seed=2, scale=30),
        "ptuning": make_p_tuning(tiny_ref, root / "ptuning", ROWS["ptuning"], seed=3, scale=30),
    }
    return Inputs(
        configs={k: (d / CONFIG).read_bytes() for k, d in dirs.items()},
        weights={k: (d / WEIGHTS).read_bytes() for k, d in dirs.items()},
    )


@dataclass
class Fuzz:
    """The server under fuzz, its data and temp directories, and what was seen."""

    server: LiveServer
    http: httpx.Client
    data: Path
    tmp: Path
    sha: dict[str, str]  # by kind: the seeded adapters' content hashes
    persona_text: str  # greedy output with the seeded prefix adapter
    statuses: Counter = field(default_factory=Counter)
    cases: int = 0
    store_changes: int = 0
    bombs: dict[str, tuple[float, int]] = field(default_factory=dict)  # id -> (s, peak bytes)

    def greedy(self, model: str) -> str:
        body = {"model": model, "prompt": "Tell me about the sea", "max_tokens": 6,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        r = self.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def fuzz(tiny_llm, inputs: Inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-server")
    tmp = root / "tmp"
    tmp.mkdir()
    with pytest.MonkeyPatch.context() as mp_:
        # Multipart parts over 1 MiB are spooled to temp files: here, where they can be seen.
        mp_.setattr(tempfile, "tempdir", str(tmp))
        config = ServeConfig(data_dir=str(root / "data"))
        store = open_store(config.data_dir, gc_interval_s=None)
        capacity = tiny_llm.engine.config.max_num_seqs + config.max_queued_requests
        engine = AsyncEngine(lambda: tiny_llm.served, capacity=capacity)
        keys = ApiKeys.from_entries([(k, t, False) for t, k in KEYS.items()])
        server = LiveServer(create_app(engine, store, config, keys)).start()
        http = server.http("acme", timeout=120)
        try:
            sha = {}
            for kind, name in SEEDED.items():
                r = send(http, mp(inputs, kind), name)
                assert r.status_code == 201, r.text
                sha[kind] = r.json()["sha256"]
            r = http.post("/v1/adapters", json={"name": "pirate", "text": "Talk like a pirate."})
            assert r.status_code == 201, r.text
            with server.http("globex") as globex:
                assert send(globex, mp(inputs, "prompt"), "persona").status_code == 201
            fuzz = Fuzz(server, http, root / "data", tmp, sha, "")
            fuzz.persona_text = fuzz.greedy("persona")
            yield fuzz
            _record(fuzz)
        finally:
            http.close()
            server.stop()
            store.close()


def _record(fuzz: Fuzz) -> None:
    if not fuzz.cases:
        return
    report.record(
        "adapter fuzz: hostile uploads",
        f"{fuzz.cases} hostile uploads over HTTP ({len(CASES)} cases, under a new name and, bombs "
        "aside, an existing one): broken safetensors, configs, pickles, unsafe archives, "
        "1 GiB zip and tar.gz bombs, content types",
        "every one a 4xx in OpenAI's error shape naming the problem; store, files, temp dir "
        "unchanged; a valid upload afterwards generates as before",
        {
            "statuses": " ".join(f"{s}x{n}" for s, n in sorted(fuzz.statuses.items())),
            "5xx": sum(n for s, n in fuzz.statuses.items() if s >= 500),
            "store changes": fuzz.store_changes,
            "bomb max s": max((s for s, _ in fuzz.bombs.values()), default=0.0),
            "bomb peak MiB": max((p for _, p in fuzz.bombs.values()), default=0) / MIB,
        },
    )


def _digest(path: Path) -> str:
    if path.is_dir():
        return "dir"
    if path.name.endswith("-shm"):  # SQLite's shared-memory index: readers write to it
        return "shm"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_state(fuzz: Fuzz) -> dict:
    """Everything an upload could change: both tenants' listings (HTTP and the store's own,
    hidden versions included), every file under the data directory with its content, the
    temp directory, and the files this process holds open there."""
    store = fuzz.server.ctx.store
    state: dict = {}
    for tenant in KEYS:
        with fuzz.server.http(tenant) as http:
            state[f"GET {tenant}"] = http.get("/v1/adapters").json()
        records = store.list(tenant)
        state[f"list {tenant}"] = records
        state[f"versions {tenant}"] = {r.name: store.versions(tenant, r.name) for r in records}
    state["files"] = {str(p.relative_to(fuzz.data)): _digest(p) for p in fuzz.data.rglob("*")}
    state["tmp"] = sorted(os.listdir(fuzz.tmp))
    state["open"] = sorted(
        target
        for fd in os.listdir("/proc/self/fd")
        if (target := _readlink(f"/proc/self/fd/{fd}")).startswith((str(fuzz.tmp), str(fuzz.data)))
        and "registry.sqlite3" not in target  # one connection per store thread, kept open
    )
    return state


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # the descriptor closed meanwhile (listdir's own, for one)
        return ""


def _refused(fuzz: Fuzz, r: httpx.Response, status: int, needle: str) -> None:
    fuzz.statuses[r.status_code] += 1
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["type"] == ERROR_TYPES[status], err
    assert needle in err["message"], err


@pytest.mark.parametrize(("status", "needle", "build"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_hostile_upload_is_refused_and_changes_nothing(
    fuzz: Fuzz, inputs: Inputs, request, status: int, needle: str, build
) -> None:
    req = build(inputs)
    bomb = request.node.callspec.id.startswith("bomb-")
    before = store_state(fuzz)
    names = ("fuzz-new",) if bomb else ("fuzz-new", "persona")  # a new name, and a new version
    for name in names:
        if not bomb:
            r = send(fuzz.http, req, name)
        else:  # Python allocations of both sides (server and client) while it is handled
            tracemalloc.start()
            started = time.perf_counter()
            try:
                r = send(fuzz.http, req, name)
                seconds = time.perf_counter() - started
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            fuzz.bombs[request.node.callspec.id] = (seconds, peak)
        fuzz.cases += 1
        _refused(fuzz, r, status, needle)
        if bomb:  # 1 GiB inflated: refused within a few times the upload's own size
            assert peak < 64 * MIB and seconds < 20, (seconds, peak)
    after = store_state(fuzz)
    fuzz.store_changes += after != before
    assert after == before


REGISTRY_FILES = {"registry.sqlite3", "registry.sqlite3-wal", "registry.sqlite3-shm"}


def assert_one_new_version(fuzz: Fuzz, before: dict, after: dict, obj: dict) -> None:
    """``after`` is ``before`` plus the upload ``obj``: in acme's listing (as its name's live
    version), the registry's files and, unless it existed, the blob named by its sha256."""
    # An upload that replaces another kind says so (``replaced_kind``); listings never do.
    obj = dict(obj)
    old = [a for a in before["GET acme"]["data"] if a["name"] == obj["name"]]
    replaced = obj.pop("replaced_kind", None)
    assert replaced == (old[0]["kind"] if old and old[0]["kind"] != obj["kind"] else None)
    listed = [a for a in before["GET acme"]["data"] if a["name"] != obj["name"]] + [obj]
    assert after["GET acme"]["data"] == sorted(listed, key=lambda a: a["name"])
    assert after["GET globex"] == before["GET globex"]
    blob = fuzz.server.ctx.store.blobs.path(obj["sha256"]).relative_to(fuzz.data)
    files = set(before["files"]) | set(after["files"])
    changed = {p for p in files if before["files"].get(p) != after["files"].get(p)}
    assert changed - REGISTRY_FILES <= {str(blob), str(blob.parent)}, changed
    assert after["files"][str(blob)] == hashlib.sha256((fuzz.data / blob).read_bytes()).hexdigest()
    assert (after["tmp"], after["open"]) == ([], [])


@pytest.mark.parametrize(("kind", "same", "build"), [c[1:] for c in VALID],
                         ids=[c[0] for c in VALID])  # fmt: skip
def test_valid_variant_is_stored_once(
    fuzz: Fuzz, inputs: Inputs, request, kind: str, same: bool, build
) -> None:
    name = "ok-" + request.node.callspec.id
    before = store_state(fuzz)
    r = send(fuzz.http, build(inputs), name)
    assert r.status_code == 201, r.text
    obj = r.json()
    assert (obj["name"], obj["kind"], obj["num_virtual_tokens"], obj["version"]) == (
        name, KINDS[kind], ROWS[kind], 1)  # fmt: skip
    assert (obj["sha256"] == fuzz.sha[kind]) is same
    assert_one_new_version(fuzz, before, store_state(fuzz), obj)
    text = fuzz.greedy(name)
    if same:
        assert text == fuzz.greedy(SEEDED[kind])


def mutate(rng: random.Random, data: bytes, focus: int) -> tuple[str, bytes]:
    """One random edit of ``data``; half of the positions fall in ``data[:focus]``."""
    out = bytearray(data)

    def at() -> int:
        return rng.randrange(focus if rng.random() < 0.5 else len(out))

    op = rng.choice(("flip", "flip", "truncate", "insert", "delete", "duplicate", "extreme"))
    if op == "flip":
        for _ in range(rng.randint(1, 4)):
            out[at()] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del out[at() :]
    elif op == "insert":
        start = at()
        out[start:start] = rng.randbytes(rng.randint(1, 16))
    elif op == "delete":
        start = at()
        del out[start : start + rng.randint(1, 64)]
    elif op == "duplicate":
        start = at()
        out[start:start] = out[start : start + rng.randint(1, 64)]
    else:
        out[at()] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
    return op, bytes(out)


def test_random_mutations_are_4xx_or_valid(fuzz: Fuzz, inputs: Inputs) -> None:
    """Seeded edits of valid files: each a 4xx that changes nothing, or a 201 (the edit left
    a valid adapter) of one new version that then generates; never a 5xx."""
    count = report.scale(24, 400)
    rng = random.Random(6)
    header_end = {k: 8 + len(json.dumps(header_of(w)[0])) for k, w in inputs.weights.items()}
    body, content_type = encoded(mp(inputs, "prompt"), "mutant")
    sources = {
        "weights-prefix": (lambda b: mp(inputs, weights=b), inputs.weights["prefix"],
                           header_end["prefix"]),
        "weights-prompt": (lambda b: mp(inputs, "prompt", weights=b), inputs.weights["prompt"],
                           header_end["prompt"]),
        "config-ptuning": (lambda b: mp(inputs, "ptuning", config=b), inputs.configs["ptuning"],
                           len(inputs.configs["ptuning"])),
        "zip": (arch, zip_of(inputs.entries()), 64),
        "zip-stored": (arch, zip_with(inputs.entries("prompt"), zipfile.ZIP_STORED), 64),
        "tgz": (arch, tar_gz_of(inputs.entries("ptuning")), 64),
        "multipart-body": (lambda b: Req(content=b, headers={"content-type": content_type}),
                           body, 512),  # the parts' headers and the config
    }  # fmt: skip
    statuses: Counter = Counter()
    for n in range(count):
        source = rng.choice(sorted(sources))
        wrap, valid, focus = sources[source]
        op, data = mutate(rng, valid, focus)
        before = store_state(fuzz)
        r = send(fuzz.http, wrap(data), "mutant")
        statuses[r.status_code] += 1
        assert r.status_code in (201, 400, 413, 415), (n, source, op, r.text)
        after = store_state(fuzz)
        if r.status_code != 201:
            error_of(r)
            assert after == before, (n, source, op)
            continue
        assert_one_new_version(fuzz, before, after, r.json())
        # (An edit of the multipart body may have renamed it.)
        completion = {"model": r.json()["name"], "prompt": "Hello", "max_tokens": 4,
                      "temperature": 1.0, "seed": n, "ignore_eos": True}  # fmt: skip
        out = fuzz.http.post("/v1/completions", json=completion)
        assert out.status_code == 200, (n, source, op, out.text)
        assert out.json()["usage"]["completion_tokens"] == 4
    report.record(
        "adapter fuzz: random mutations",
        f"{count} seeded random edits (bit flips, truncations, insertions, deletions, "
        "duplications) of valid safetensors files, a config, .zip and .tar.gz archives and a "
        "whole multipart body, uploaded over HTTP",
        "each a 4xx that changed nothing, or a 201 of one new version that then generated; no 5xx",
        {
            "statuses": " ".join(f"{s}x{c}" for s, c in sorted(statuses.items())),
            "5xx": sum(c for s, c in statuses.items() if s >= 500),
            "accepted and generated": statuses[201],
        },
    )
    assert sum(statuses.values()) == count


def test_valid_upload_after_the_fuzz_generates_as_before(fuzz: Fuzz, inputs: Inputs) -> None:
    r = send(fuzz.http, mp(inputs), "after")
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == fuzz.sha["prefix"]
    assert fuzz.greedy("after") == fuzz.persona_text
    # Every hostile upload named "persona" too: it is still the seeded version 1.
    persona = fuzz.http.get("/v1/adapters/persona").json()
    assert (persona["version"], persona["sha256"]) == (1, fuzz.sha["prefix"])
    assert fuzz.greedy("persona") == fuzz.persona_text
