"""Backpressure and lifecycle over real HTTP (tiny random model): 429 with Retry-After under a
full queue while accepted requests finish; client disconnects and timeouts free KV blocks;
/health and /ready; drain on SIGTERM (a real ``prefix-serve serve`` process) and drain timeout;
what start-up built is kept out of the garbage collector's scans while the engine runs."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from http_helpers import TINY_ID, error_of, make_llm

from adapters_store.store import open_store
from server.api import create_app
from server.api.server import DrainingServer
from server.async_engine import AsyncEngine
from server.config import ApiKeys, ServeConfig

LONG = {"model": TINY_ID, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True}


@pytest.fixture(scope="module")
def one_seat_llm(tiny_model_dir):
    return make_llm(tiny_model_dir, max_num_seqs=1)


def test_full_queue_is_429_and_accepted_requests_finish(make_server, one_seat_llm):
    # 1 running + 1 waiting, one tenant may hold both (the per-tenant share is tested in
    # tests/reliability/test_hostile_engine.py).
    server = make_server(one_seat_llm, max_queued_requests=1, max_tenant_share=1.0)
    results: list = [None, None]

    def run(i: int) -> None:
        with server.http() as http:
            body = {**LONG, "prompt": f"request {i}", "max_tokens": 60, "temperature": 0}
            results[i] = http.post("/v1/completions", json=body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while server.engine.outstanding < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with server.http() as http:
        r = http.post("/v1/completions", json={**LONG, "max_tokens": 5})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert error_of(r)["type"] == "overloaded_error"
    with pytest.raises(openai.RateLimitError):
        server.openai().chat.completions.create(
            model=TINY_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    for t in threads:
        t.join(60)
    for r in results:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 60
    server.wait_idle()
    assert server.openai().completions.create(model=TINY_ID, prompt="x", max_tokens=2)


def test_streaming_disconnect_aborts_and_frees_blocks(make_server, tiny_llm):
    server = make_server(tiny_llm)
    with server.http() as http:
        before = server.engine_state()["generated"]
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: closing the iterator would close the stream
            events = 0
            while events < 3:
                events += next(lines).startswith("data: ")
            assert server.engine_state()["seqs"] == 1
        # Leaving the block closed the connection mid-stream.
        state = server.wait_idle(timeout=3)
    assert state["running"] == state["waiting"] == 0
    assert state["generated"] - before < LONG["max_tokens"] // 4  # stopped early


def test_disconnect_while_queued_aborts_it(make_server, one_seat_llm):
    """A streaming request still waiting for its first token (the only seat is taken) whose
    client leaves is dropped from the queue; the handler answers 499, not a 5xx."""
    server = make_server(one_seat_llm, max_queued_requests=4)
    body = {**LONG, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as running:
        lines = running.iter_lines()  # kept: closing the iterator would close the stream
        assert next(lines).startswith("data: ")
        impatient = server.http(timeout=httpx.Timeout(30, read=0.5))
        with impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=body)
        deadline = time.monotonic() + 3
        while (state := server.engine_state())["seqs"] != 1:
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        assert (state["running"], state["waiting"]) == (1, 0)
    server.wait_idle()
    with server.http(tenant=None) as ops:
        metrics = ops.get("/metrics").text
    assert 'prefix_serve_http_requests_total{route="/v1/completions",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics


def test_non_streaming_disconnect_aborts_and_frees_blocks(make_server, tiny_llm):
    server = make_server(tiny_llm)
    timeout = httpx.Timeout(30, read=0.5)
    with server.http(timeout=timeout) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=LONG)  # the client gives up and closes
    server.wait_idle(timeout=3)


def test_request_timeout_is_503_and_frees_blocks(make_server, tiny_llm):
    server = make_server(tiny_llm, request_timeout=0.4)
    with server.http() as http:
        r = http.post("/v1/completions", json=LONG)
        assert r.status_code == 503 and error_of(r)["code"] == "timeout"
        assert r.headers["retry-after"] == "5"
        server.wait_idle()
        r = http.post("/v1/completions", json={**LONG, "stream": True})
        assert r.status_code == 200  # headers went out with the first token
        last = [b for b in r.text.split("\n\n") if b][-2:]
        assert json.loads(last[0][len("data: ") :])["error"]["code"] == "timeout"
        assert last[1] == "data: [DONE]"
    server.wait_idle()


def test_health_and_ready_follow_the_engine(make_server, tiny_llm):
    gate = threading.Event()

    def slow_build():
        gate.wait(30)
        return tiny_llm.served

    server = make_server(tiny_llm, build=slow_build, wait_ready=False)
    with server.http(tenant=None) as ops, server.http() as http:
        assert ops.get("/health").status_code == 200
        r = ops.get("/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        r = http.post("/v1/completions", json={**LONG, "max_tokens": 2})
        assert r.status_code == 503 and error_of(r)["code"] == "engine_unavailable"
        assert "retry-after" in r.headers
        gate.set()
        deadline = time.monotonic() + 10
        while ops.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200
        server.engine.stop()  # the engine thread is gone: not healthy, not ready
        assert ops.get("/health").status_code == 503
        assert ops.get("/ready").status_code == 503
        assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 503


def test_drain_timeout_aborts_what_is_left(tiny_llm, tmp_path):
    """Under ``DrainingServer`` (in a thread; the signal handler called directly)."""
    store = open_store(tmp_path, gc_interval_s=None)
    app = create_app(AsyncEngine(lambda: tiny_llm.served, 8), store, ServeConfig(), ApiKeys())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = DrainingServer(config, app.state.ctx, drain_timeout=0.3)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 20
        while not (server.started and app.state.ctx.engine.ready):
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        body = {**LONG, "stream": True}
        with (
            httpx.Client(base_url=url, trust_env=False, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            started = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: ") :])
        assert last.get("error", {}).get("code") == "engine_unavailable", (len(rest), rest[-2])
        thread.join(10)
        assert not thread.is_alive() and server.exit_code == 0
        assert 0.3 <= time.monotonic() - started < 5
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


def test_sigterm_drains_running_requests_then_exits_0(tiny_model_dir, tmp_path):
    """A real ``prefix-serve serve`` process, configured through the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PREFIX_SERVE_PORT": str(port),
        "PREFIX_SERVE_MODEL": str(tiny_model_dir),
        "PREFIX_SERVE_DATA_DIR": str(tmp_path),
        "PREFIX_SERVE_KV_CACHE_MEMORY": "64MiB",
        "PREFIX_SERVE_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=60)
    try:
        _wait_ready(http, proc)
        got: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {**LONG, "max_tokens": 300, "stream": True, "temperature": 0}
            with http.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line:
                        got.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        assert http.get("/ready").status_code == 503
        r = http.post("/v1/completions", json={**LONG, "max_tokens": 2})
        assert r.status_code == 503 and error_of(r)["code"] == "draining"
        reader.join(60)
        assert got[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: ") :]) for line in got[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        http.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_ready(http: httpx.Client, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if http.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)


def test_start_up_objects_are_out_of_the_collectors_scans_while_the_engine_runs(tiny_llm):
    """A full collection holds every thread, the event loop's too, for as long as it scans:
    what is alive once the engine has loaded (here a stand-in for a model's many objects) is
    frozen out of the scans until the engine stops, and collectable again after."""
    made_before = [[i] for i in range(100_000)]
    probe = made_before[-1]
    engine = AsyncEngine(lambda: tiny_llm.served, 8)
    loop = asyncio.new_event_loop()
    engine.start(loop)
    try:
        deadline = time.monotonic() + 20
        while not engine.ready:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert gc.get_freeze_count() >= len(made_before)
        assert not any(o is probe for o in gc.get_objects())
        made_after = [[i] for i in range(10)]  # what requests create is scanned as ever
        assert any(o is made_after[-1] for o in gc.get_objects())
    finally:
        engine.stop()
        loop.close()
    assert any(o is probe for o in gc.get_objects())
