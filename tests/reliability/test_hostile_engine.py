"""Hostile tenants against the engine: an adapter whose values overflow the model is refused
at upload, and one that is already stored (an older server accepted it) fails its own requests
alone while every other tenant's requests in the same steps get exactly their solo output;
one tenant flooding the queue gets 429 while another is still admitted; one holding every
seat or filling the KV pool gives up its own sequences, not another tenant's.

Real HTTP (uvicorn in a thread), the tiny model whose output follows its whole context
(``sharp_model``), real PEFT adapters; nothing mocked.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from http_helpers import CONFIG, WEIGHTS, error_of, files_of, make_llm, upload
from report import record
from safetensors.torch import load, load_file, save
from sharp_model import client, generate
from transformers import AutoConfig

from adapters_store.formats import parse_adapter
from adapters_store.validate import ModelShape
from server.engine.model_runner import kv_bytes_per_token

N_NEW = 8
MARGIN = 1000.0  # adapter values may be this many times the model's own (docs/api.md)


def hostile_files(path: Path, peak: float) -> dict:
    """``path``'s PEFT adapter with its values rescaled so the largest is ``peak``."""
    table = load_file(str(path / WEIGHTS))["prompt_embeddings"]
    scaled = (table / table.abs().max() * peak).contiguous()
    return {
        "config": (CONFIG, (path / CONFIG).read_bytes(), "application/json"),
        "weights": (WEIGHTS, save({"prompt_embeddings": scaled}), "application/octet-stream"),
    }


def _peak(weights: bytes) -> float:
    return float(load(weights)["prompt_embeddings"].abs().max())


def test_overflowing_adapters_are_refused_at_upload(make_server, llm, peft):
    """Values near float32's limit (finite, so the old checks passed) would overflow attention
    or the activations: 400 naming the limit (1000x the largest key/value or embedding the
    model itself produces), nothing stored. 100x the model's own scale, far beyond what
    training gives, is still accepted and served."""
    server = make_server(llm)
    refused, accepted = 0, {}
    with server.http("globex") as http:
        for kind in ("prefix", "prompt"):
            path = peft(kind, 401)
            limit = None
            for peak in (3e37, 1e20, "just over"):
                if peak == "just over":
                    peak = 1.01 * limit
                r = upload(http, f"bomb-{kind}", **hostile_files(path, peak))
                assert r.status_code == 400, (kind, peak, r.text)
                err = error_of(r)
                assert err["param"] == "weights" and err["code"] == "invalid_adapter"
                limit = float(re.search(r"accepts at most (\S+) ", err["message"]).group(1))
                refused += 1
            scale = llm.shape.model_kv_abs if kind == "prefix" else llm.shape.model_embedding_abs
            assert limit == float(f"{MARGIN * max(scale, 1.0):.3g}")
            assert http.get(f"/v1/adapters/bomb-{kind}").status_code == 404
            fine = hostile_files(path, 100 * scale)
            r = upload(http, f"loud-{kind}", **fine)
            assert r.status_code == 201, r.text
            accepted[kind] = (round(_peak(fine["weights"][1]), 3), limit)
            body = {"model": f"loud-{kind}", "prompt": "Hello", "max_tokens": 4}
            assert http.post("/v1/completions", json=body).status_code == 200
    record(
        "hostile: overflowing adapter at upload",
        "prefix-tuning and prompt-tuning uploads whose largest value is 3e37, 1e20 and just "
        "over the limit (the limit: 1000x the largest key/value or embedding the model "
        "itself produces); and at 100x the model's own scale",
        "each over the limit refused 400 (param weights, the limit named), nothing stored; "
        "100x accepted and served",
        {
            "kv_limit": accepted["prefix"][1],
            "embedding_limit": accepted["prompt"][1],
            "refused": refused,
            "accepted_peak_prefix": accepted["prefix"][0],
            "accepted_peak_prompt": accepted["prompt"][0],
        },
    )


def send(http: httpx.Client, body: dict) -> tuple[int, str]:
    """(status, text or error code) of a request, streamed or not."""
    chat = "messages" in body
    route = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"ignore_eos": True, "max_tokens": N_NEW, **body}
    if not body.get("stream"):
        r = http.post(route, json=body)
        if r.status_code != 200:
            return r.status_code, error_of(r)["code"]
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"] if chat else choice["text"]
    parts = []
    with http.stream("POST", route, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, error_of(r)["code"]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 200, "stream-error:" + chunk["error"]["code"]
                for c in chunk["choices"]:
                    parts.append((c["delta"].get("content") or "") if chat else c["text"])
    return 200, "".join(parts)


def all_at_once(server, requests: list[tuple[httpx.Client, dict]]) -> list[tuple[int, str]]:
    """Every request queued while the engine loop is held, so the engine takes them together
    (same steps, same batch)."""
    entered, gate = threading.Event(), threading.Event()

    def hold(_llm) -> None:
        entered.set()
        gate.wait(60)

    holder = threading.Thread(target=server.engine.call_blocking, args=(hold, 90))
    holder.start()
    assert entered.wait(30)
    with ThreadPoolExecutor(len(requests)) as pool:
        try:
            futures = [pool.submit(send, http, body) for http, body in requests]
            deadline = time.monotonic() + 30
            while server.engine.outstanding < len(requests):
                assert time.monotonic() < deadline, server.engine.outstanding
                time.sleep(0.005)
        finally:
            gate.set()
            holder.join()
        return [f.result() for f in futures]


def test_overflowing_adapter_fails_only_its_own_requests(make_server, llm, ref, peft):
    """A prefix adapter at 3.3e38 already in the store (uploaded before the upload bound existed)
    is used by globex, greedy and sampled, streamed and not, in the same steps as acme's
    requests of every kind: globex's requests answer 400 (non-finite), acme's get exactly the
    text each gets alone, and nothing of globex's poisons the cache or leaks a block."""
    server = make_server(llm)
    acme, globex = client(server, "key-acme"), client(server, "key-globex")
    for name, kind, seed in (("persona", "prefix", 150), ("soft", "prompt", 160)):
        assert upload(acme, name, **files_of(peft(kind, seed))).status_code == 201
    assert (
        acme.post("/v1/adapters", json={"name": "desk", "text": "Night desk. "}).status_code == 201
    )
    bomb = hostile_files(peft("prefix", 150), 3.3e38)  # acme's adapter, near float32's max
    legacy = parse_adapter(
        bomb["config"][1], bomb["weights"][1], ModelShape.from_config(ref.config)
    )
    server.ctx.store.put("globex", "bomb", legacy)
    victims = [
        {"model": "persona", "prompt": "The harbour master said", "temperature": 0},
        {"model": "soft", "prompt": "Ships at dawn", "temperature": 0, "stream": True},
        {"model": "tiny-sharp", "adapters": ["desk"], "prompt": "Where", "temperature": 0},
        {"model": "persona", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0},
        {"model": "tiny-sharp", "prompt": "Count:", "temperature": 0.8, "seed": 7},
    ]
    alone = [send(acme, body) for body in victims]
    assert all(status == 200 for status, _ in alone), alone
    attacks = [
        {"model": "bomb", "prompt": "The harbour master said", "temperature": 1.0},
        {"model": "bomb", "prompt": "Ships at dawn", "temperature": 0},
        {"model": "bomb", "prompt": "Count:", "temperature": 0.7, "stream": True},
        {"model": "bomb", "messages": [{"role": "user", "content": "Hi"}], "n": 3},
    ]
    server.wait_idle()
    mixed = all_at_once(
        server,
        [(globex, b) for b in attacks[:2]]
        + [(acme, b) for b in victims]
        + [(globex, b) for b in attacks[2:]],
    )
    victim_results = mixed[2 : 2 + len(victims)]
    attack_results = mixed[:2] + mixed[2 + len(victims) :]
    assert victim_results == alone
    assert attack_results == [(400, "non_finite_error")] * len(attacks)
    again = [send(acme, body) for body in victims]
    assert again == alone
    state = server.wait_idle()
    assert state["seqs"] == 0
    record(
        "hostile: overflowing adapter in the batch",
        f"{len(attacks)} requests of globex with a stored 3.3e38 prefix adapter (greedy, sampled, "
        f"streamed, n=3) in the same steps as {len(victims)} of acme's (prefix, prompt tuning, "
        "text prefix, chat, sampled)",
        "globex's requests 400 non_finite_error; each of acme's equals its solo output, during "
        "and after; no block leaked",
        {"attacker_requests": len(attacks), "victim_requests": len(victims), "victim_equal": 5},
    )


def test_a_tenant_holding_every_seat_does_not_hold_off_another(make_server, model_dir):
    """globex's n=4 request of 400 tokens each takes every seat of a 4-seat engine; acme's
    request is seated within steps (one of globex's sequences preempted, resumed later mostly
    from the prefix cache) and answered while globex's still runs; globex's four greedy
    choices come back whole and equal, the preempted one included."""
    server = make_server(make_llm(model_dir, max_num_seqs=4))
    acme, globex = client(server, "key-acme"), client(server, "key-globex")
    victim = {"model": "tiny-sharp", "prompt": "Hello there"}
    alone, _ = generate(acme, victim)
    server.wait_idle()
    long = {"model": "tiny-sharp", "prompt": "Flood", "n": 4, "max_tokens": 400}
    long |= {"temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        flood = pool.submit(globex.post, "/v1/completions", json=long)
        deadline = time.monotonic() + 30
        while server.engine.snapshot().running < 4:
            assert time.monotonic() < deadline and not flood.done()
            time.sleep(0.005)
        start = time.monotonic()
        text, usage = generate(acme, victim)
        latency = time.monotonic() - start
        assert not flood.done(), "acme waited for globex's whole request"
        r = flood.result(timeout=120)
    assert (text, usage["completion_tokens"]) == (alone, 8)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4 and r.json()["usage"]["completion_tokens"] == 4 * 400
    assert len({c["text"] for c in choices}) == 1
    snap = server.engine.snapshot()
    assert snap.share_preemptions >= 1 and snap.preemptions == 0
    record(
        "hostile: one tenant holds every seat",
        "globex's n=4 x 400-token request on a 4-seat engine; acme sends one 8-token request",
        "acme seated within steps (globex's newest sequence preempted for its share) and "
        "answered while globex's request ran; globex's 4 greedy choices whole and equal",
        {
            "seats": 4,
            "share_preemptions": snap.share_preemptions,
            "acme_latency_s": round(latency, 2),
        },
    )


def test_a_tenant_filling_the_kv_pool_preempts_its_own_sequences(make_server, model_dir):
    """A 24-block pool (384 positions); globex's n=4 request of 150 tokens each needs more
    than that, so its sequences must take turns. acme's request, arriving once the pool is
    full, is admitted and never the one preempted for blocks (before, as the newest running
    sequence, it was): globex's own newest sequences are. Both answers come back whole; the
    preempted globex choices equal the others."""
    config = AutoConfig.from_pretrained(model_dir)
    per_block = kv_bytes_per_token(config, torch.float32) * 16
    llm = make_llm(model_dir, max_num_seqs=8, kv_cache_memory=24 * per_block)
    assert llm.engine.pool.num_blocks == 24
    server = make_server(llm)
    acme, globex = client(server, "key-acme"), client(server, "key-globex")
    victim = {"model": "tiny-sharp", "prompt": "Hello there, how are you today?"}
    victim["max_tokens"] = 32
    alone, _ = generate(acme, victim)
    server.wait_idle()
    victims: list[str] = []
    sched = llm.engine.scheduler
    preempt = sched._preempt

    def recorded(seq, out):  # observe the real scheduler's choices
        victims.append(seq.tenant)
        preempt(seq, out)

    sched._preempt = recorded
    long = {"model": "tiny-sharp", "prompt": "Flood", "n": 4, "max_tokens": 150}
    long |= {"temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        flood = pool.submit(globex.post, "/v1/completions", json=long)
        deadline = time.monotonic() + 60
        while server.engine.snapshot().free_blocks > 1 or not victims:
            assert time.monotonic() < deadline and not flood.done(), victims
            time.sleep(0.005)
        before = len(victims)
        text, usage = generate(acme, victim)
        during = victims[before:]
        r = flood.result(timeout=120)
    assert (text, usage["completion_tokens"]) == (alone, 32)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4 and r.json()["usage"]["completion_tokens"] == 4 * 150
    assert len({c["text"] for c in choices}) == 1
    assert "acme" not in victims and set(victims) == {"globex"}, victims
    snap = server.engine.snapshot()
    assert snap.preemptions + snap.share_preemptions == len(victims) and snap.preemptions >= 1
    record(
        "hostile: one tenant fills the KV pool",
        "a 24-block pool; globex's n=4 x 150-token request needs more; acme sends a 32-token "
        "request once the pool is full",
        "acme admitted and never preempted for blocks; globex's own newest sequences were; "
        "both answers whole, globex's 4 greedy choices equal",
        {"blocks": 24, "preemptions": len(victims), "while_acme_ran": len(during)},
    )


def test_flooding_tenant_gets_429_while_another_is_admitted(make_server, llm):
    """globex fills its share of the queue with n=16 requests of many tokens; its next one
    answers 429 (tenant_share_exceeded) while acme's requests are still admitted and answered,
    and acme's time to first token stays bounded."""
    max_seqs, queued = llm.engine.config.max_num_seqs, 32
    server = make_server(llm, max_queued_requests=queued)
    limit = (max_seqs + queued) // 2  # the default share, 0.5, as the keys name two tenants
    globex, acme = client(server, "key-globex"), client(server, "key-acme")
    flood_body = {"model": "tiny-sharp", "prompt": "Flood", "n": 16, "max_tokens": 200}
    flood_body["ignore_eos"] = True
    stop = threading.Event()
    statuses: list[int] = []

    def flood() -> None:
        with client(server, "key-globex") as http:
            while not stop.is_set():
                statuses.append(http.post("/v1/completions", json=flood_body).status_code)

    ttfts: list[float] = []
    with ThreadPoolExecutor(8) as pool:
        try:
            for _ in range(8):
                pool.submit(flood)
            deadline = time.monotonic() + 30
            while server.engine.outstanding < limit - 15:
                assert time.monotonic() < deadline, server.engine.outstanding
                time.sleep(0.01)
            r = globex.post("/v1/completions", json=flood_body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert error_of(r)["code"] == "tenant_share_exceeded"
            for i in range(6):
                start = time.monotonic()
                _, usage = generate(acme, {"model": "tiny-sharp", "prompt": f"Hello {i}"})
                ttfts.append(time.monotonic() - start)
                assert usage["completion_tokens"] == 8
        finally:
            stop.set()
    assert 429 in statuses
    assert server.engine.tenant_limit == limit
    admissions = dict(server.engine.admissions)
    assert admissions["tenant_share"] >= 1 and admissions.get("capacity", 0) == 0
    record(
        "hostile: queue flood by one tenant",
        f"8 globex clients sending n=16 x 200-token requests in a loop (its share: {limit} of "
        f"{max_seqs}+{queued}); acme sends 6 requests meanwhile",
        "globex answered 429 tenant_share_exceeded past its share; every acme request admitted "
        "and answered",
        {
            "tenant_limit": limit,
            "globex_429": statuses.count(429),
            "globex_200": statuses.count(200),
            "acme_200": 6,
            "acme_latency_max_s": round(max(ttfts), 2),
        },
    )
