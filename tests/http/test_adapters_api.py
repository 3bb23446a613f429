"""/v1/adapters over real HTTP: multipart files, .zip and .tar.gz of a PEFT output directory,
text prefixes; safe archive handling; tenant isolation (get, use, list, delete) and prefix-cache
namespaces taken from the key only (tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from http_helpers import (
    CONFIG,
    TINY_ID,
    WEIGHTS,
    error_of,
    files_of,
    peft_entries,
    tar_gz_of,
    upload,
    zip_of,
)

from adapters_store.types import Quota
from bench.peft_adapters import make_p_tuning, make_prefix_tuning, make_prompt_tuning


@pytest.fixture(scope="module")
def peft_dirs(tiny_ref, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {
        # A random model's logits are flat: large adapters make their effect visible.
        "prefix": make_prefix_tuning(tiny_ref, root / "prefix", 8, seed=1, scale=30),
        "prefix2": make_prefix_tuning(tiny_ref, root / "prefix2", 8, seed=2, scale=30),
        "prompt": make_prompt_tuning(tiny_ref, root / "prompt", 5, seed=3, scale=30),
        "ptuning": make_p_tuning(tiny_ref, root / "ptuning", 4, seed=4, scale=30),
    }


@pytest.fixture
def server(make_server, tiny_llm):
    return make_server(tiny_llm)


def greedy(server, model: str, adapters=(), tenant="acme", prompt="Tell me about the sea") -> str:
    out = server.openai(tenant).completions.create(
        model=model,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True, "adapters": list(adapters)},
    )
    return out.choices[0].text


def test_upload_files_archives_text_and_versions(server, peft_dirs):
    with server.http() as http:
        r = upload(http, "persona", **files_of(peft_dirs["prefix"]))
        assert r.status_code == 201, r.text
        obj = r.json()
        assert set(obj) == {
            "id", "object", "name", "kind", "num_virtual_tokens", "version", "sha256",
            "size_bytes", "created", "owned_by",
        }  # fmt: skip
        assert (obj["object"], obj["name"], obj["kind"]) == ("adapter", "persona", "prefix_tuning")
        assert (obj["num_virtual_tokens"], obj["version"], obj["owned_by"]) == (8, 1, "acme")
        zipped = zip_of(peft_entries(peft_dirs["prompt"]))
        r = upload(http, "soft", archive=("soft.zip", zipped, "application/zip"))
        assert r.status_code == 201 and r.json()["kind"] == "prompt_tuning", r.text
        tgz = tar_gz_of(peft_entries(peft_dirs["ptuning"], prefix=""))
        r = upload(http, "encoder", archive=("encoder.tar.gz", tgz, "application/gzip"))
        assert r.status_code == 201 and r.json()["kind"] == "p_tuning", r.text
        r = http.post("/v1/adapters", json={"name": "pirate-talk", "text": "Talk like a pirate."})
        assert r.status_code == 201 and r.json()["kind"] == "text", r.text
        # Same name again: a new version, the old one is no longer served.
        r = upload(http, "persona", **files_of(peft_dirs["prefix2"]))
        assert (r.json()["version"], r.json()["sha256"]) != (1, obj["sha256"])
        assert http.get("/v1/adapters/persona").json()["version"] == 2
        names = [a["name"] for a in http.get("/v1/adapters").json()["data"]]
        assert sorted(names) == ["encoder", "persona", "pirate-talk", "soft"]
    models = {m.id: m.model_extra["parent"] for m in server.openai().models.list().data}
    assert models == {TINY_ID: None, "encoder": TINY_ID, "persona": TINY_ID,
                      "pirate-talk": TINY_ID, "soft": TINY_ID}  # fmt: skip


def test_adapters_change_generation_and_compose(server, peft_dirs):
    with server.http() as http:
        upload(http, "a", **files_of(peft_dirs["prefix"]))
        upload(http, "b", **files_of(peft_dirs["prompt"]))
    bare = greedy(server, TINY_ID)
    with_a = greedy(server, "a")
    assert with_a != bare
    assert greedy(server, TINY_ID, ["a"]) == with_a  # `adapters` = `model` for one adapter
    assert greedy(server, "a", ["b"]) == greedy(server, TINY_ID, ["a", "b"])
    composed = server.openai().completions.create(
        model="a", prompt=[5, 6, 7], max_tokens=1, extra_body={"adapters": ["b"]}
    )
    assert composed.usage.prompt_tokens == 8 + 5 + 3  # both adapters' virtual tokens, then ours
    with server.http() as http:  # a new version is used by the next request
        upload(http, "a", **files_of(peft_dirs["prefix2"]))
    assert greedy(server, "a") != with_a


def test_unsupported_types_are_415(server, peft_dirs):
    with server.http() as http:
        r = http.post("/v1/adapters", content=b"hello", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and error_of(r)["type"] == "unsupported_media_type"
        r = upload(http, "x", archive=("x.rar", b"Rar!\x1a\x07\x00" + b"\0" * 64, "x/rar"))
        assert r.status_code == 415 and error_of(r)["param"] == "archive"


def test_bad_uploads_are_400_and_store_nothing(server, peft_dirs):
    good = peft_entries(peft_dirs["prefix"])
    cfg, wts = good["my-adapter/" + CONFIG], good["my-adapter/" + WEIGHTS]
    lora = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}).encode()
    cases = {
        "unknown format": dict(config=(CONFIG, lora), weights=(WEIGHTS, wts)),
        "weights not safetensors": dict(config=(CONFIG, cfg), weights=(WEIGHTS, b"\x80\x04pickle")),
        "only config": dict(config=(CONFIG, cfg)),
        "config and archive": dict(config=(CONFIG, cfg), archive=("a.zip", zip_of(good))),
        "missing weights": dict(archive=("a.zip", zip_of({CONFIG: cfg}))),
        "zip symlink": dict(archive=("a.zip", zip_of({CONFIG: cfg}, {WEIGHTS: "/etc/passwd"}))),
        "tar symlink": dict(archive=("a.tgz", tar_gz_of({CONFIG: cfg}, {WEIGHTS: "/etc/x"}))),
        "zip traversal": dict(archive=("a.zip", zip_of({"../" + CONFIG: cfg, WEIGHTS: wts}))),
        "tar absolute": dict(archive=("a.tgz", tar_gz_of({"/" + CONFIG: cfg, WEIGHTS: wts}))),
        "twice": dict(archive=("a.zip", zip_of({CONFIG: cfg, "d/" + CONFIG: cfg, WEIGHTS: wts}))),
        "corrupt zip": dict(archive=("a.zip", zip_of(good)[:-30])),
        "split dirs": dict(archive=("a.zip", zip_of({"a/" + CONFIG: cfg, "b/" + WEIGHTS: wts}))),
    }
    with server.http() as http:
        for label, files in cases.items():
            r = upload(http, "bad", **files)
            assert r.status_code == 400, (label, r.text)
            assert error_of(r)["type"] == "invalid_request_error"
        for name in ("Bad Name", "-x", "a" * 65):
            r = upload(http, name, **files_of(peft_dirs["prefix"]))
            assert r.status_code == 400 and error_of(r)["code"] == "invalid_name", r.text
        r = http.post("/v1/adapters", files=files_of(peft_dirs["prefix"]))
        assert r.status_code == 400 and error_of(r)["param"] == "name"
        r = http.post(
            "/v1/adapters", data={"name": "x", "extra": "1"}, files=files_of(peft_dirs["prefix"])
        )
        assert r.status_code == 400 and error_of(r)["param"] == "extra"
        for body in ({"name": "t"}, {"name": "t", "text": 5}, {"name": "t", "text": "x", "k": 1}):
            r = http.post("/v1/adapters", json=body)
            assert r.status_code == 400, (body, r.text)
        r = http.post("/v1/adapters", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert http.get("/v1/adapters").json()["data"] == []


def test_too_large_adapters_are_413(make_server, tiny_llm, peft_dirs):
    server = make_server(tiny_llm, quota=Quota(max_upload_bytes=2048))
    cfg = (peft_dirs["prefix"] / CONFIG).read_bytes()
    bomb = tar_gz_of({CONFIG: cfg, "README.md": bytes(8 << 20)})  # 8 MiB of zeros
    assert len(bomb) < 64 << 10
    with server.http() as http:
        r = upload(http, "big", **files_of(peft_dirs["prefix"]))  # 4 KiB of weights
        assert r.status_code == 413 and error_of(r)["param"] == "weights", r.text
        r = upload(http, "big", archive=("a.tgz", bomb))
        assert r.status_code == 413 and error_of(r)["type"] == "request_too_large", r.text
        r = http.post("/v1/adapters", json={"name": "t", "text": "x" * 200_000})
        assert r.status_code == 413, r.text
        assert http.get("/v1/adapters").json()["data"] == []


def test_text_uploads_are_json_requests_bounded_by_the_request_limit(make_server, tiny_llm):
    server = make_server(tiny_llm, max_request_bytes=4096)
    with server.http() as http:
        body = json.dumps({"name": "t", "text": "x" * 5000}).encode()  # 5,025 bytes
        r = http.post("/v1/adapters", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert error_of(r)["code"] == "body_too_large"
        assert "is 5025 bytes; the limit is 4096" in error_of(r)["message"]
        chunked = iter([b'{"name": "t", "text": "', b"x" * 5000, b'"}'])  # no Content-Length
        r = http.post("/v1/adapters", content=chunked, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over 4096 bytes" in error_of(r)["message"], r.text
        r = http.post("/v1/adapters", json={"name": "t", "text": "x" * 4000})
        assert (r.status_code, r.json()["version"]) == (201, 1), r.text
        assert [a["name"] for a in http.get("/v1/adapters").json()["data"]] == ["t"]


def test_tenant_isolation(server, peft_dirs):
    acme, globex = server.http("acme"), server.http("globex")
    assert upload(acme, "persona", **files_of(peft_dirs["prefix"])).status_code == 201
    seen_by_globex = [
        globex.get("/v1/adapters/persona"),
        globex.delete("/v1/adapters/persona"),
        globex.post("/v1/completions", json={"model": "persona", "prompt": "x"}),
        globex.post(
            "/v1/completions", json={"model": TINY_ID, "prompt": "x", "adapters": ["persona"]}
        ),
    ]
    assert globex.get("/v1/adapters").json() == {"object": "list", "data": []}
    assert [m.id for m in server.openai("globex").models.list().data] == [TINY_ID]
    assert acme.get("/v1/adapters/persona").status_code == 200  # globex's delete did nothing
    acme_output = greedy(server, "persona")
    # Globex's answers equal those for an adapter that exists nowhere.
    assert acme.delete("/v1/adapters/persona").status_code == 200
    missing = [
        acme.get("/v1/adapters/persona"),
        acme.delete("/v1/adapters/persona"),
        acme.post("/v1/completions", json={"model": "persona", "prompt": "x"}),
        acme.post(
            "/v1/completions", json={"model": TINY_ID, "prompt": "x", "adapters": ["persona"]}
        ),
    ]
    for theirs, absent in zip(seen_by_globex, missing, strict=True):
        assert theirs.status_code == absent.status_code == 404
        assert theirs.json() == absent.json()
    # The same name in two tenants: two independent adapters.
    upload(acme, "persona", **files_of(peft_dirs["prefix"]))
    r = upload(globex, "persona", **files_of(peft_dirs["prefix2"]))
    assert r.json()["version"] == 1 and r.json()["owned_by"] == "globex"
    assert greedy(server, "persona", tenant="acme") == acme_output
    assert greedy(server, "persona", tenant="globex") != acme_output
    acme.close()
    globex.close()


def test_prefix_cache_namespace_is_the_tenant(server, tiny_llm):
    prompt = "Shared secret system prompt: " + "lorem ipsum dolor sit amet " * 8
    n_prompt = len(tiny_llm.tokenizer.encode(prompt))
    body = {"model": TINY_ID, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    # Fields that might try to pick a namespace are ignored: only the key decides.
    spoof = {**body, "user": "acme", "tenant": "acme", "cache_salt": "acme", "namespace": "acme"}
    with server.http("acme") as acme, server.http("globex") as globex:
        first = acme.post("/v1/completions", json=body).json()["usage"]
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        other = globex.post("/v1/completions", json=spoof).json()["usage"]
        assert other["prompt_tokens_details"]["cached_tokens"] == 0
        again = acme.post("/v1/completions", json=body).json()["usage"]
        assert again["prompt_tokens_details"]["cached_tokens"] == (n_prompt - 1) // 16 * 16 > 0
