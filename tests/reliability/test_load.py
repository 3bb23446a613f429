"""Sustained load on a real ``prefix-serve serve`` process: 64 concurrent streaming clients of 8
tenants, each tenant with its own key, two PEFT adapters (prefix tuning, prompt tuning) and a
text prefix, the clients cycling over the base model, each adapter and compositions of them,
against a bounded queue (so that 429s occur). Every request is answered (200 or 429, every
stream complete), resident memory stays flat after warm-up, every KV block is free of requests
once idle, and a greedy request answers exactly as it did before the load.

Fast (``make test``): the tiny random model for ~18 s. Full (``make reliability``): the CPU
default model (SmolLM2-135M) for 4.5 minutes.

Also: an idle keep-alive connection outlives client pools' idle expiry (a full-size run once
lost two requests to the race between the two).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch
from http_helpers import files_of
from reliability_helpers import LoadResult, ServeProcess, Target, run_load
from report import FULL, record, scale
from transformers import AutoModelForCausalLM

from bench.peft_adapters import make_prefix_tuning, make_prompt_tuning

CLIENTS = 64
TENANTS = 8
MAX_NUM_SEQS = 16
MAX_QUEUED = 16  # capacity 32 < 64 clients: the queue fills and some requests get 429
MAX_TOKENS = 16
SECONDS = scale(18.0, 270.0)
WARMUP_S = scale(6.0, 45.0)  # RSS is compared from here on
SAMPLE_EVERY_S = scale(0.5, 5.0)
GREEDY_PROMPT = "The history of the lighthouse"


@pytest.fixture(scope="module")
def model(request, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The served model's directory and its PEFT adapters, two per tenant (distinct seeds)."""
    if FULL:
        model_dir = request.getfixturevalue("default_model_dir")
        ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        sizes, strength = (16, 8), 1.0
    else:
        model_dir = request.getfixturevalue("tiny_model_dir")
        ref = request.getfixturevalue("tiny_ref")
        sizes, strength = (8, 5), 30.0  # a random model's logits are flat: strong adapters
    root = tmp_path_factory.mktemp("load-adapters")
    adapters = {}
    for t in range(TENANTS):
        adapters[f"prefix-{t}"] = make_prefix_tuning(
            ref, root / f"prefix-{t}", sizes[0], seed=2 * t, scale=strength
        )
        adapters[f"soft-{t}"] = make_prompt_tuning(
            ref, root / f"soft-{t}", sizes[1], seed=2 * t + 1, scale=strength
        )
    return model_dir, adapters


def _upload_adapters(server: ServeProcess, adapters: dict[str, Path]) -> None:
    for t in range(TENANTS):
        with server.http(f"tenant-{t}") as http:
            for name in ("persona", "style"):
                source = adapters[f"{'prefix' if name == 'persona' else 'soft'}-{t}"]
                r = http.post("/v1/adapters", data={"name": name}, files=files_of(source))
                assert r.status_code == 201, r.text
            text = f"You are the assistant of tenant {t}. Answer briefly."
            r = http.post("/v1/adapters", json={"name": "system", "text": text})
            assert r.status_code == 201, r.text


def _targets(server: ServeProcess, base: str) -> list[Target]:
    """Per tenant: the base model, each adapter alone, and three compositions."""
    out = []
    for t in range(TENANTS):
        key = server.keys[f"tenant-{t}"]
        out += [
            Target(key, base),
            Target(key, "persona"),
            Target(key, "style"),
            Target(key, "system"),
            Target(key, "persona", ("style",)),
            Target(key, "system", ("persona",)),
            Target(key, base, ("system", "style", "persona")),
        ]
    return out


def _greedy(server: ServeProcess, base: str) -> list[tuple[str, int]]:
    """(text, completion tokens) of greedy requests on the base model and on a composition."""
    out = []
    with server.http("tenant-0") as http:
        for model, adapters in ((base, []), ("persona", ["style"])):
            body = {"model": model, "prompt": GREEDY_PROMPT, "max_tokens": 24}
            body |= {"temperature": 0, "ignore_eos": True, "adapters": adapters}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            out.append((r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]))
    return out


def _wait_idle(server: ServeProcess, timeout: float = 60.0) -> dict[str, float]:
    names = (
        "prefix_serve_requests_running",
        "prefix_serve_requests_waiting",
        "prefix_serve_kv_cache_usage_ratio",
    )
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if all(metrics[n] == 0 for n in names):
            return metrics
        assert time.monotonic() < deadline, {n: metrics[n] for n in names}
        time.sleep(0.2)


def _sample_rss(server: ServeProcess, stop: threading.Event, out: list[tuple[float, int]]):
    start = time.monotonic()
    while not stop.wait(SAMPLE_EVERY_S):
        out.append((time.monotonic() - start, server.rss_bytes()))


def _load_sampling_rss(
    server: ServeProcess, targets: list[Target]
) -> tuple[LoadResult, float, list[tuple[float, int]]]:
    """The load's outcomes, its duration and (seconds into the load, RSS) samples."""
    rss: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(server, stop, rss))
    sampler.start()
    started = time.monotonic()
    try:
        result = asyncio.run(run_load(server.url, targets, CLIENTS, SECONDS, MAX_TOKENS))
    finally:
        stop.set()
        sampler.join()
    return result, time.monotonic() - started, rss


def _figures(result: LoadResult, duration: float, rss: list, rss_end: int) -> dict:
    warm = next(r for t, r in rss if t >= WARMUP_S)
    cuts = statistics.quantiles(result.ttfts, n=100)
    return {
        "duration_s": round(duration, 1),
        "clients": CLIENTS,
        "tenants": TENANTS,
        "adapters": 3 * TENANTS,
        "max_num_seqs": MAX_NUM_SEQS,
        "max_queued": MAX_QUEUED,
        "requests": result.sent,
        "ok_200": result.statuses[200],
        "overloaded_429": result.statuses[429],
        "5xx": sum(n for s, n in result.statuses.items() if isinstance(s, int) and s >= 500),
        "transport_errors": result.statuses["transport"],
        "broken_streams": result.broken,
        "tokens": result.tokens,
        "output_tok_s": round(result.tokens / duration, 1),
        "ttft_p50_ms": round(cuts[49] * 1000),
        "ttft_p99_ms": round(cuts[98] * 1000),
        "rss_warm_mib": round(warm / 2**20, 1),
        "rss_peak_mib": round(max(r for _, r in rss) / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_growth_pct": round(100 * (rss_end - warm) / warm, 2),
    }


def test_64_clients_over_tenants_and_adapters(model, tmp_path):
    model_dir, adapters = model
    keys = {f"tenant-{t}": f"key-load-{t}" for t in range(TENANTS)}
    env = {
        "PREFIX_SERVE_MAX_NUM_SEQS": str(MAX_NUM_SEQS),
        "PREFIX_SERVE_MAX_QUEUED_REQUESTS": str(MAX_QUEUED),
        "PREFIX_SERVE_KV_CACHE_MEMORY": scale("64MiB", "256MiB"),
    }
    if not FULL:  # the tiny model gains nothing from intra-op threads (OpenMP spins)
        env["OMP_NUM_THREADS"] = "1"
    server = ServeProcess(model_dir, tmp_path, keys, env).start()
    try:
        _upload_adapters(server, adapters)
        with server.http("tenant-0") as http:
            base = http.get("/v1/models").json()["data"][0]["id"]
        targets = _targets(server, base)
        before = _greedy(server, base)
        assert _greedy(server, base) == before  # deterministic alone, cached prefix or not
        result, duration, rss = _load_sampling_rss(server, targets)
        metrics = _wait_idle(server)
        rss_end = server.rss_bytes()
        after = _greedy(server, base)
    finally:
        code = server.stop()
    figures = _figures(result, duration, rss, rss_end)
    record(
        "load: 64 streaming clients, 8 tenants",
        f"{CLIENTS} clients x {duration:.0f} s over {len(targets)} base/adapter/composition "
        f"targets, queue bounded at {MAX_NUM_SEQS}+{MAX_QUEUED}",
        "every request 200 or 429, every stream complete; RSS flat after warm-up; KV free "
        "when idle; greedy output unchanged",
        figures,
    )
    assert result.unexpected() == {}, (result.statuses, result.errors)
    assert (result.broken, result.stream_errors) == (0, 0), result.errors
    assert result.statuses[200] > 0 and result.statuses[429] > 0, result.statuses
    assert result.tokens == result.statuses[200] * MAX_TOKENS  # every stream ran to its end
    # The server counted the same answers (and the 4 greedy ones), nothing else on the route.
    route = 'prefix_serve_http_requests_total{route="/v1/completions",status="%s"}'
    answered = {s: metrics.get(route % s, 0) for s in ("200", "429")}
    assert answered == {"200": result.statuses[200] + 4, "429": result.statuses[429]}
    assert not [k for k in metrics if "/v1/completions" in k and 'status="5' in k]
    assert figures["rss_growth_pct"] < 5, (figures, rss)
    assert after == before
    assert code == 0


def test_idle_keep_alive_connection_outlives_client_pools(tiny_model_dir, tmp_path):
    """httpx (and so the openai client) keeps an idle connection for 5 s. Had the server closed
    idle connections at 5 s as well (uvicorn's default), a client reusing one at that moment
    got no response: the transport errors the full-size load run once saw. The server must
    hold an idle connection longer than that, and answer on it."""
    server = ServeProcess(tiny_model_dir, tmp_path, {"acme": "key-acme"}).start()
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-acme\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(request)
            assert _response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(6.0)
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing to read; b"" would mean closed
                sock.recv(1, socket.MSG_PEEK)
            sock.setblocking(True)
            sock.sendall(request)
            assert _response(sock).startswith(b"HTTP/1.1 200")
    finally:
        server.stop()


def _response(sock: socket.socket) -> bytes:
    """The head of one whole HTTP/1.1 response (its Content-Length body read and dropped)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:])
    while len(body) < int(fields[b"content-length"]):
        body += _recv(sock)
    assert len(body) == int(fields[b"content-length"])
    return head


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, "the server closed the connection"
    return chunk
