"""Tenant isolation under real HTTP (a tiny random model): the prefix cache never crosses
tenants whatever the request says, adapter churn around hot adapters leaves their greedy outputs
byte-identical, and a batch mixing tenants and adapter kinds gives every request the output it
gets alone, which is the hand reference's. (Get/use/list/delete isolation is in tests/http.)

The model (``sharp_model``) is one whose output follows its whole context, so a swapped
adapter shows.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from http_helpers import files_of, make_llm, upload
from report import record, scale
from sharp_model import MODEL_ID, client, generate, positions, run_batch, scrape

from bench.reference import adapter_segment, greedy, text_segment

DESK = "You are the night desk of a harbour office. Ships arrive at dawn and sail at dusk. "
HITS = "prefix_serve_prefix_cache_hits_total"
STREAM = {"stream": True}


def test_same_prompt_in_two_tenants_never_hits_across(make_server, llm, peft):
    """Identical adapters (same bytes, same names) and identical prompts in acme and globex:
    each tenant's first request computes everything (cached_tokens 0, the hits counter does
    not move), each tenant's repeat takes exactly the whole blocks of its own copy."""
    server = make_server(llm)
    tok, bs = llm.tokenizer, llm.engine.config.block_size
    acme, globex = server.http("acme"), server.http("globex")
    for http in (acme, globex):
        assert upload(http, "persona", **files_of(peft("prefix", 101))).status_code == 201
        assert upload(http, "soft", **files_of(peft("prompt", 102))).status_code == 201
        assert http.post("/v1/adapters", json={"name": "desk", "text": DESK}).status_code == 201
    # (body, text-adapter text, virtual tokens): one distinct first block per case.
    cases = [
        ({"model": MODEL_ID, "prompt": "Isolation case one: " + "north pier " * 12}, "", 0),
        ({"model": "persona", "prompt": "Isolation case two, the tide tables for May"}, "", 8),
        ({"model": "desk", "adapters": ["soft"], "prompt": "Case three: who is on duty?"}, DESK, 5),
        ({"model": "soft", "messages": [{"role": "user", "content": "Case four, berth?"}]}, "", 5),
        ({"model": "persona", "prompt": "Case five, streamed: the keeper's log", **STREAM}, "", 8),
    ]
    full_hits = 0
    for body, text, virtual in cases:
        n = positions(tok, body, text, virtual)
        full = (n - 1) // bs * bs  # the last position is always computed (its logits)
        assert full >= bs
        before = scrape(server)[HITS]
        outs = [generate(http, body) for http in (acme, globex)]
        assert scrape(server)[HITS] == before  # neither first request hit anything
        outs += [generate(http, body) for http in (acme, globex)]
        assert scrape(server)[HITS] - before == 2 * full
        assert [u["prompt_tokens"] for _, u in outs] == [n] * 4
        cached = [u["prompt_tokens_details"]["cached_tokens"] for _, u in outs]
        assert cached == [0, 0, full, full], body
        assert len({t for t, _ in outs}) == 1  # same bytes in, same greedy text out
        full_hits += full
    # Both tenants at once, the same new prompt: neither may take the other's blocks, not even
    # those being computed in the same step.
    body = {"model": "persona", "prompt": "Concurrent case: " + "south quay " * 10}
    full = (positions(tok, body, "", 8) - 1) // bs * bs
    before = scrape(server)[HITS]
    together, running = run_batch(server, [(acme, body), (globex, body)])
    assert running == 2
    assert [u["prompt_tokens_details"]["cached_tokens"] for _, u in together] == [0, 0]
    assert scrape(server)[HITS] == before
    again = [generate(h, body)[1]["prompt_tokens_details"]["cached_tokens"] for h in (acme, globex)]
    assert again == [full, full]
    acme.close()
    globex.close()
    record(
        "isolation: prefix cache per tenant",
        f"{len(cases) + 1} prompts (base, prefix, text+prompt tuning, chat, stream, concurrent) "
        "sent by two tenants holding identical adapters",
        "0 cached tokens and no hits-counter move across tenants; repeats hit whole blocks",
        {"cases": len(cases) + 1, "cross_tenant_cached_tokens": 0, "same_tenant_hits": full_hits},
    )


SPOOF_BODY = {
    "user": "acme",
    "tenant": "acme",
    "namespace": "acme",
    "cache_salt": "acme",
    "salt": "acme",
    "prefix_cache_namespace": "acme",
    "organization": "acme",
}
SALTED_REPEATS = 3
SPOOF_HEADERS = {
    "X-Tenant": "acme",
    "X-Tenant-Id": "acme",
    "X-Namespace": "acme",
    "X-Cache-Salt": "acme",
    "X-User": "acme",
    "OpenAI-Organization": "acme",
    "OpenAI-Project": "acme",
}


def test_client_supplied_salt_or_namespace_is_ignored(make_server, llm, peft):
    """Body fields and headers naming a tenant, a namespace or a cache salt (vLLM's
    ``cache_salt``) change nothing: globex naming acme gets no hit and none of acme's
    adapters; acme with salts of its own still hits its cache."""
    server = make_server(llm)
    tok, bs = llm.tokenizer, llm.engine.config.block_size
    acme, globex = server.http("acme"), server.http("globex")
    assert upload(acme, "private", **files_of(peft("prefix", 103))).status_code == 201
    cases = [
        ({"model": MODEL_ID, "prompt": "Salted case: the cargo manifest lists " * 3}, 0),
        ({"model": "private", "prompt": "Salted adapter case: the cargo manifest lists"}, 8),
    ]
    for body, virtual in cases:
        full = (positions(tok, body, "", virtual) - 1) // bs * bs
        before = scrape(server)[HITS]
        text, usage = generate(acme, body)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        if body["model"] == MODEL_ID:
            spoofed = generate(globex, {**body, **SPOOF_BODY}, **SPOOF_HEADERS)
            assert spoofed[1]["prompt_tokens_details"]["cached_tokens"] == 0
            assert spoofed[0] == text
        else:  # naming acme does not lend acme's adapters either
            for extra in ({}, {"model": MODEL_ID, "adapters": ["private"]}):
                r = globex.post(
                    "/v1/completions", json={**body, **SPOOF_BODY, **extra}, headers=SPOOF_HEADERS
                )
                assert r.status_code == 404, r.text
        assert scrape(server)[HITS] == before
        for i in range(SALTED_REPEATS):  # acme, salted differently each time: its own cache
            salt = {k: f"salt-{i}-{k}" for k in SPOOF_BODY}
            headers = {k: "globex" for k in SPOOF_HEADERS}
            again, usage = generate(acme, {**body, **salt}, **headers)
            assert usage["prompt_tokens_details"]["cached_tokens"] == full > 0
            assert again == text
        assert scrape(server)[HITS] - before == SALTED_REPEATS * full
    acme.close()
    globex.close()
    record(
        "isolation: client-supplied namespace ignored",
        f"{len(SPOOF_BODY)} body fields and {len(SPOOF_HEADERS)} headers naming another "
        "tenant, a namespace or a cache salt",
        "no cross-tenant hit or adapter; same-tenant hits unchanged",
        {
            "spoof_fields": len(SPOOF_BODY) + len(SPOOF_HEADERS),
            "salted_repeats_hit": SALTED_REPEATS * len(cases),
        },
    )


# Churn around hot adapters. ----------------------------------------------------------------------
COLD_PROMPT = "Churn probe: the weather at sea tomorrow"
DEVICE_EVICTIONS = 'prefix_serve_adapter_tier_evictions_total{tier="device"}'
HOST_EVICTIONS = 'prefix_serve_adapter_tier_evictions_total{tier="host"}'
DEVICE_LOADS = 'prefix_serve_adapter_tier_loads_total{tier="device"}'


def put(http: httpx.Client, name: str, content, peft) -> httpx.Response:
    """Upload ``content`` (``("text", str)`` or ``(kind, seed)``) as ``name``."""
    kind, value = content
    if kind == "text":
        return http.post("/v1/adapters", json={"name": name, "text": value})
    return upload(http, name, **files_of(peft(kind, value)))


def churn(http: httpx.Client, worker: int, ops: int, contents, baseline, peft) -> dict:
    """``ops`` random uploads, replacements, uses and deletes of three names of the caller's;
    every answer is checked: versions count up, a name serves its latest content, a deleted
    name is a 404."""
    rng = random.Random(worker)
    names = [f"cold-{worker}-{j}" for j in range(3)]
    live: dict[str, int] = {}
    puts = dict.fromkeys(names, 0)
    done = dict.fromkeys(("uploads", "replacements", "uses", "deletes"), 0)
    for _ in range(ops):
        name = rng.choice(names)
        action = "put" if name not in live else rng.choice(["put", "put", "use", "use", "delete"])
        if action == "put":
            k = rng.choice([i for i in range(len(contents)) if i != live.get(name)])
            r = put(http, name, contents[k], peft)
            assert r.status_code == 201, r.text
            puts[name] += 1
            assert r.json()["version"] == puts[name]
            done["replacements" if name in live else "uploads"] += 1
            live[name] = k
        if action in ("put", "use"):
            text, _ = generate(http, {"model": name, "prompt": COLD_PROMPT})
            assert text == baseline[live[name]], (name, contents[live[name]])
            done["uses"] += 1
        if action == "delete":
            r = http.delete(f"/v1/adapters/{name}")
            assert r.status_code == 200 and r.json()["deleted"] is True, r.text
            del live[name]
            r = http.post("/v1/completions", json={"model": name, "prompt": COLD_PROMPT})
            assert r.status_code == 404, r.text
            done["deletes"] += 1
    return done


def test_hot_adapters_unchanged_under_churn(make_server, model_dir, peft):
    """Hot adapters of each kind (prefix tuning, prompt tuning, P-tuning, text, a composition)
    in two tenants keep byte-identical greedy outputs while other adapters are uploaded,
    replaced, deleted and evicted from both adapter tiers around them (tiers of a few KiB, a
    KV pool of 48 blocks)."""
    # A prefix adapter here is 4 KiB of KV: the tiers hold two or three adapters.
    llm = make_llm(model_dir, kv_cache_memory=384 << 10, adapter_cache_bytes=10_000)
    server = make_server(llm, host_cache_bytes=12_000)
    acme, globex = server.http("acme"), server.http("globex")
    hot_uploads = {
        acme: [("hot-prefix", ("prefix", 111)), ("hot-soft", ("prompt", 112))],
        globex: [("hot-prefix", ("prefix", 113)), ("hot-ptune", ("ptuning", 114))],
    }
    for http, items in hot_uploads.items():
        for name, content in items:
            assert put(http, name, content, peft).status_code == 201
    assert put(acme, "hot-desk", ("text", DESK), peft).status_code == 201
    question = [{"role": "user", "content": "Hot chat: which berth is free?"}]
    hot = {
        acme: [
            {"model": "hot-prefix", "prompt": "Hot request: the pilot boards at"},
            {"model": "hot-soft", "prompt": "Hot request, streamed: the pilot", "stream": True},
            {"model": "hot-desk", "prompt": "Hot request: who signs the log?"},
            {"model": MODEL_ID, "adapters": ["hot-desk", "hot-prefix"], "prompt": "Hot: a gale"},
            {"model": "hot-soft", "messages": question},
        ],
        globex: [
            {"model": "hot-prefix", "prompt": "Hot request: the pilot boards at"},
            {"model": "hot-ptune", "prompt": "Hot request: the pilot boards at", "stream": True},
        ],
    }
    expected = {http: [generate(http, body)[0] for body in bodies] for http, bodies in hot.items()}
    everything = [t for texts in expected.values() for t in texts]
    assert len(set(everything)) == len(everything)  # a mixed-up adapter would show
    contents = [("prefix", s) for s in (121, 122, 123, 124)] + [("prompt", s) for s in (131, 132)]
    contents += [("ptuning", 141), ("text", "Cold text one. " * 4), ("text", "Cold two. " * 5)]
    baseline = []
    for k, content in enumerate(contents):  # what each content answers, alone
        assert put(acme, f"ref-{k}", content, peft).status_code == 201
        baseline.append(generate(acme, {"model": f"ref-{k}", "prompt": COLD_PROMPT})[0])
        assert acme.delete(f"/v1/adapters/ref-{k}").status_code == 200
    assert len(set(baseline)) == len(contents), baseline

    before = scrape(server)
    stop = threading.Event()
    compared = [0, 0]

    def keep_checking(i: int, http: httpx.Client) -> None:
        while True:
            last_pass = stop.is_set()
            for body, want in zip(hot[http], expected[http], strict=True):
                assert generate(http, body)[0] == want, body
                compared[i] += 1
            if last_pass:
                return

    ops = scale(24, 240)
    with ThreadPoolExecutor(4) as pool:
        checkers = [pool.submit(keep_checking, i, h) for i, h in enumerate((acme, globex))]
        churners = [
            pool.submit(churn, h, w, ops, contents, baseline, peft)
            for w, h in enumerate((acme, globex))
        ]
        try:
            done = [f.result() for f in churners]
        finally:
            stop.set()
        for f in checkers:
            f.result()
    after = scrape(server)
    moved = {k: after[k] - before[k] for k in (DEVICE_EVICTIONS, HOST_EVICTIONS, DEVICE_LOADS)}
    assert min(moved.values()) > 0, moved
    server.wait_idle()  # no request left a KV block behind
    acme.close()
    globex.close()
    totals = {k: sum(d[k] for d in done) for k in done[0]}
    record(
        "isolation: hot adapters under churn",
        f"{2 * ops} churn operations in two tenants (upload, new version, use, delete) around "
        f"{sum(map(len, hot.values()))} hot requests of every adapter kind; tiers of ~10 KB",
        "every hot output byte-identical to its baseline; every cold use served its latest "
        "version; deleted names 404",
        {
            **totals,
            "hot_outputs_compared": sum(compared),
            "device_evictions": int(moved[DEVICE_EVICTIONS]),
            "host_evictions": int(moved[HOST_EVICTIONS]),
            "device_loads": int(moved[DEVICE_LOADS]),
        },
    )


# A batch mixing tenants and adapters. -------------------------------------------------------
GROUPS = ("acme", "globex", "initech")  # each with a shadow tenant "<t>-solo" of equal adapters
PROMPTS = (
    "Mixed batch, first: the ferry timetable says",
    "Mixed batch, second: a gale warning",
    "Mixed batch, third: the harbour fees for a yacht are",
    "Mixed batch, fourth: unloading grain takes",
)
SPECS = {
    "base": {"model": MODEL_ID},
    "prefix": {"model": "prefix"},
    "prompt": {"model": MODEL_ID, "adapters": ["soft"]},
    "ptuning": {"model": "ptune"},
    "text": {"model": "sys"},
    "text+prefix": {"model": "sys", "adapters": ["prefix"]},
    "chat+prompt": {"model": "soft"},
}
N_NEW = 8


def test_mixed_tenant_batch_equals_alone_and_the_reference(make_server, llm, ref, peft):
    """Three tenants x seven adapter set-ups x two (full: four) prompts in flight at once: each
    request's output equals the one it gets alone (sent one by one, by a tenant holding the
    same adapters) and again with a warm cache; for every adapter kind it equals the hand
    reference's (``bench.reference``)."""
    prompts = PROMPTS[: scale(2, 4)]
    tenants = [t for g in GROUPS for t in (g, g + "-solo")]
    keys = {t: f"key-{t}" for t in tenants}
    server = make_server(llm, keys=keys)
    https = {t: client(server, keys[t]) for t in tenants}
    for g, group in enumerate(GROUPS):
        dirs = {"prefix": ("prefix", 150 + g), "soft": ("prompt", 160 + g)}
        dirs["ptune"] = ("ptuning", 170 + g)
        dirs["sys"] = ("text", f"You answer for {group}. " + DESK)
        for tenant in (group, group + "-solo"):
            for name, content in dirs.items():
                assert put(https[tenant], name, content, peft).status_code == 201
    requests = []
    for group in GROUPS:
        for label, spec in SPECS.items():
            for prompt in prompts:
                body = {**spec, "max_tokens": N_NEW, "stream": len(requests) % 3 == 0}
                if label.startswith("chat"):
                    body["messages"] = [{"role": "user", "content": prompt}]
                else:
                    body["prompt"] = prompt
                requests.append((group, body))

    batch = [(https[t], body) for t, body in requests]
    cold, peak = run_batch(server, batch)
    alone = [generate(https[t + "-solo"], body) for t, body in requests]
    warm, _ = run_batch(server, batch)
    bs = llm.engine.config.block_size
    for (t, body), c, a, w in zip(requests, cold, alone, warm, strict=True):
        assert c[0] == a[0] == w[0], (t, body)
        n = a[1]["prompt_tokens"]
        assert c[1]["prompt_tokens"] == w[1]["prompt_tokens"] == n
        assert c[1]["completion_tokens"] == a[1]["completion_tokens"] == N_NEW
        assert w[1]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // bs * bs
    assert peak == min(len(requests), llm.engine.config.max_num_seqs)
    per_setup = len(SPECS) * len(prompts)
    for i in range(per_setup):  # the tenants' adapters differ, so must their outputs
        if list(SPECS)[i // len(prompts)] != "base":
            assert len({cold[i + g * per_setup][0] for g in range(len(GROUPS))}) == len(GROUPS)

    # The hand reference's greedy output for acme's adapters of every kind, on every prompt.
    tok = llm.tokenizer
    sys_ids = tok.encode(f"You answer for {GROUPS[0]}. " + DESK, add_special_tokens=False)
    segments = {
        kind: adapter_segment(ref, peft(kind, seed))
        for kind, seed in (("prefix", 150), ("prompt", 160), ("ptuning", 170))
    }
    compared = 0
    for p, prompt in enumerate(prompts):
        ids = tok.encode(prompt)
        chat_ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        refs = {
            "base": greedy(ref, ids, N_NEW),
            "prefix": greedy(ref, ids, N_NEW, [segments["prefix"]]),
            "prompt": greedy(ref, ids, N_NEW, [segments["prompt"]]),
            "ptuning": greedy(ref, ids, N_NEW, [segments["ptuning"]]),
            "text": greedy(ref, ids, N_NEW, [text_segment(sys_ids)]),
            "chat+prompt": greedy(ref, list(chat_ids), N_NEW, [segments["prompt"]]),
        }
        for label, result in refs.items():
            want = result.comparable()
            assert len(want) == N_NEW, f"{label}, {prompt!r}: reference tie at step {len(want)}"
            got = cold[list(SPECS).index(label) * len(prompts) + p][0]
            assert got == tok.decode(want, skip_special_tokens=True), (label, prompt)
            compared += 1
    for http in https.values():
        http.close()
    record(
        "isolation: mixed-tenant batch",
        f"{len(requests)} requests of {len(GROUPS)} tenants and {len(SPECS)} adapter set-ups "
        "queued while the engine loop was held (it takes them in one go), cold and warm cache, "
        "against each request alone",
        "every output identical to the one alone; the hand reference's for every adapter kind",
        {
            "requests": len(requests),
            "peak_running": peak,
            "outputs_compared": 3 * len(requests),
            "reference_compared": compared,
        },
    )
