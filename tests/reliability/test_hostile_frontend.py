"""One tenant cannot hurt another through the HTTP front end (tiny random model, real uvicorn):

- maximal bodies (just under ``--max-request-bytes``) of every prompt shape, and of millions
  of values in any field, leave the event loop free: bodies of many values are parsed in the
  JSON parser process and refused there past its limits, text that cannot fit the context is
  refused by its size in bytes before it is tokenized, lists whose validation alone would hold
  the loop are refused by their length, and what is tokenized is tokenized in the worker pool;
  ``/health`` and another tenant's requests answer meanwhile;
- malformed JSON (nesting past the limit, lone UTF-16 surrogates) is a 400 naming the field,
  never a 500, and the keep-alive connection it came on serves the next request;
- requests that end because their client left or their time ran out are counted
  (``finish_reason="abort"``) and logged with the tokens they had; a body refused for its size
  is logged and counted under the route it was sent to.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from http_helpers import KEYS, TINY_ID
from report import record

from adapters_store.store import open_store
from server.api import create_app
from server.api.server import DrainingServer
from server.async_engine import AsyncEngine
from server.config import ApiKeys, ServeConfig

# What stays on the event loop for a maximal body: a body that may hold many values is parsed
# in the JSON parser process, and only its bounded answer is loaded back (under 0.03 s); any
# other is parsed in place, at most ~32k values (a few ms) plus C scans of its 8 MiB (~0.05 s
# in all). /health answered in 0.054 s at worst here; it was 0.3-0.5 s when every body was
# parsed on the loop (0.6 s for four million values nested in lists), and 5-7 s when the
# whole prompt was tokenized there. The bound leaves room for a machine shared with other work.
HEALTH_BOUND_S = 0.25
OTHER_TENANT_BOUND_S = 1.0
SMALL = {"model": TINY_ID, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}


def _series(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _longest_token_bytes(tokenizer) -> int:
    """Most UTF-8 bytes one token of this (byte-level BPE) vocabulary decodes to."""
    ids = range(len(tokenizer))
    return max(len(tokenizer.decode([i], skip_special_tokens=False).encode()) for i in ids)


def _fill(size: int, make) -> bytes:
    """``make(k)``'s JSON at the largest ``k`` whose body stays within ``size`` bytes (each
    step of ``k`` adds the same few bytes)."""
    one, two = (len(json.dumps(make(k))) for k in (1, 2))
    body = json.dumps(make(1 + (size - one) // (two - one))).encode()
    assert size - (two - one) < len(body) <= size, (len(body), size)
    return body


class _Watch:
    """Polls ``/health`` (no key) and sends another tenant's small completion, each back to
    back in a thread of its own, recording every latency, until closed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.health: list[tuple[int, float]] = []
        self.other: list[tuple[int, float]] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(None, "GET", "/health", None, self.health)),
            threading.Thread(
                target=self._loop,
                args=(KEYS["globex"], "POST", "/v1/completions", SMALL, self.other),
            ),
        ]

    def _loop(self, key, method, path, body, out) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(base_url=self.url, headers=headers, trust_env=False, timeout=60) as h:
            while not self.stop.is_set():
                start = time.perf_counter()
                r = h.request(method, path, json=body)
                out.append((r.status_code, time.perf_counter() - start))
                time.sleep(0.01)

    def __enter__(self) -> _Watch:
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 30
        while not (self.health and self.other):  # both running before the attack starts
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_maximal_prompts_leave_the_event_loop_free(make_server, tiny_llm):
    server = make_server(tiny_llm)
    size = server.ctx.config.max_request_bytes
    context = tiny_llm.engine.max_model_len
    token_bytes = _longest_token_bytes(tiny_llm.tokenizer)
    cap = context * token_bytes  # the most text that can fit the context, in UTF-8 bytes
    model = {"model": TINY_ID}
    word = "word "  # 5 bytes, tokenized to one or two tokens: far more than the context
    under = cap // len(word) * word  # just under the cap: tokenized, then too long
    attacks = {
        "text prompt": (
            "/v1/completions",
            _fill(size, lambda k: {**model, "prompt": word * k}),
            "prompt",
        ),
        "list of text prompts": (
            "/v1/completions",
            _fill(size, lambda k: {**model, "prompt": [word * k] * 8}),
            "prompt",
        ),
        "token ids": (
            "/v1/completions",
            _fill(size, lambda k: {**model, "prompt": [7] * k}),
            "prompt",
        ),
        "token ids in one-id lists": (
            "/v1/completions",
            _fill(size, lambda k: {**model, "prompt": [[7]] * k}),
            "prompt",
        ),
        "objects in a field the server ignores": (
            "/v1/completions",
            _fill(size, lambda k: {**model, "prompt": "hi", "metadata": [{}] * k}),
            "metadata",
        ),
        "chat content": (
            "/v1/chat/completions",
            _fill(size, lambda k: {**model, "messages": [{"role": "user", "content": word * k}]}),
            "messages",
        ),
        "chat content parts": (
            "/v1/chat/completions",
            _fill(
                size,
                lambda k: {
                    **model,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * k}],
                },
            ),
            "messages",
        ),
        # Under the byte cap: tokenized (in the worker pool), then refused by the engine.
        "text prompt under the cap": (
            "/v1/completions",
            json.dumps({**model, "prompt": under}).encode(),
            "prompt",
        ),
        "chat under the cap": (
            "/v1/chat/completions",
            json.dumps({**model, "messages": [{"role": "user", "content": under}]}).encode(),
            "messages",
        ),
    }
    answers: dict[str, tuple[int, str | None, str, float]] = {}
    with server.http() as http, _Watch(server.url) as watch:
        for name, (route, body, _) in attacks.items():
            start = time.perf_counter()
            r = http.post(route, content=body, headers={"content-type": "application/json"})
            took = time.perf_counter() - start
            err = r.json().get("error") or {}
            answers[name] = (r.status_code, err.get("param"), err.get("message"), took)
    health = [s for _, s in watch.health]
    other = [s for _, s in watch.other]
    figures = {
        "body_bytes": size,
        "text_cap_bytes": cap,
        "health_polls": len(health),
        "health_worst_s": round(max(health), 3),
        "health_p50_s": round(statistics.median(health), 4),
        "other_tenant_requests": len(other),
        "other_tenant_worst_s": round(max(other), 3),
        "other_tenant_p50_s": round(statistics.median(other), 4),
        **{f"answer_s[{name}]": round(a[3], 3) for name, a in answers.items()},
    }
    record(
        "maximal prompts",
        f"{len(attacks)} bodies of every prompt shape, each just under --max-request-bytes "
        "or just under the text cap, while /health and another tenant's 4-token completions "
        "were sent back to back",
        f"/health always under {HEALTH_BOUND_S} s, the other tenant's requests all 200 under "
        f"{OTHER_TENANT_BOUND_S} s; text over max_model_len x longest token refused untokenized",
        figures,
    )
    assert {name: a[:2] for name, a in answers.items()} == {
        name: (400, param) for name, (_, _, param) in attacks.items()
    }, answers
    text_bytes = len(json.loads(attacks["text prompt"][1])["prompt"].encode())
    assert answers["text prompt"][2] == (
        f"the prompt is {text_bytes} bytes of text; at most {cap} bytes can fit the context "
        f"of {context} tokens (at most {token_bytes} bytes a token)"
    )
    assert {s for s, _ in watch.health} == {200} and {s for s, _ in watch.other} == {200}
    assert len(health) >= 20, figures  # the poller really ran throughout
    assert max(health) < HEALTH_BOUND_S, figures
    assert max(other) < OTHER_TENANT_BOUND_S, figures


class _Connection:
    """One keep-alive HTTP/1.1 connection on a raw socket: every request goes over it, so a
    server that closes the connection after an answer makes the next request fail here."""

    def __init__(self, url: str, key: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 30)
        self.key = key
        self.buf = b""

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head_bytes, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._recv()
        payload, self.buf = self.buf[:length], self.buf[length:]
        assert headers.get("connection") != "close", (lines[0], payload)
        return int(lines[0].split()[1]), json.loads(payload)

    def _recv(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the keep-alive connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_malformed_json_is_400_and_keeps_the_connection(make_server, tiny_llm):
    server = make_server(tiny_llm)
    m = f'"model": "{TINY_ID}"'
    chat, comp = "/v1/chat/completions", "/v1/completions"
    user = '"messages": [{"role": "user", "content": "hi"}]'
    # (route, body, status, param): the top-level object is one level of nesting, so
    # ``[`` x 63 inside it is 64 levels (the limit) and ``[`` x 64 is one too many.
    cases = [
        (comp, f'{{{m}, "prompt": {_nested(100_000)}}}', 400, None),  # RecursionError
        (comp, f'{{{m}, "prompt": {_nested(64)}}}', 400, "prompt"),
        (comp, f'{{{m}, "prompt": "x", "n": 1, "extra": {{"a": {_nested(900)}}}}}', 400, "extra"),
        (comp, f'{{{m}, "prompt": "x", "max_tokens": 2, "extra": {_nested(63)}}}', 200, None),
        (comp, f'{{{m}, "prompt": {_nested(63)}}}', 400, "prompt.str"),  # pydantic's own
        (comp, f'{{{m}, "prompt": "a\\ud800b"}}', 400, "prompt"),
        (comp, f'{{{m}, "prompt": ["ok", "\\udfff"]}}', 400, "prompt"),
        (comp, f'{{{m}, "prompt": "x", "adapters": ["\\udc00"]}}', 400, "adapters"),
        (comp, f'{{{m}, "prompt": "x", "\\ud800": 1}}', 400, None),
        (comp, f'{{{m}, "prompt": "ok \\ud83d\\ude00", "max_tokens": 2}}', 200, None),  # a pair
        (chat, f'{{{m}, "messages": {_nested(100_000)}}}', 400, None),
        (
            chat,
            f'{{{m}, "messages": [{{"role": "user", "content": {_nested(70)}}}]}}',
            400,
            "messages",
        ),
        (chat, f'{{{m}, "messages": [{{"role": "user", "content": "\\ud800"}}]}}', 400, "messages"),
        (chat, f'{{{m}, {user}, "adapters": ["a", "\\udbff"]}}', 400, "adapters"),
        (chat, f'{{{m}, {user}, "max_tokens": 2, "extra": {_nested(63)}}}', 200, None),
    ]
    bodies = [(route, body.encode(), status, param) for route, body, status, param in cases]
    # A lone surrogate written as raw (invalid) UTF-8 rather than as an escape.
    bodies.append((comp, f'{{{m}, "prompt": "a'.encode() + b"\xed\xa0\x80" + b'"}', 400, "prompt"))
    bodies.append(
        (
            chat,
            f'{{{m}, "messages": [{{"role": "user", "content": "'.encode()
            + b"\xed\xbf\xbf"
            + b'"}]}',
            400,
            "messages",
        )
    )
    valid = json.dumps({**SMALL, "max_tokens": 2}).encode()
    conn = _Connection(server.url, KEYS["acme"])
    got, after = [], []
    try:
        for route, body, _, _ in bodies:
            status, answer = conn.post(route, body)
            error = answer.get("error") or {}
            got.append((status, error.get("param"), error.get("code")))
            after.append(conn.post(comp, valid)[0])  # the same connection still serves
    finally:
        conn.close()
    malformed = sum(status == 400 for _, _, status, _ in bodies)
    record(
        "malformed JSON",
        f"{malformed} bodies nesting up to 100,000 deep or holding lone UTF-16 surrogates "
        "(escaped or raw) in prompts, messages, adapters and keys, and "
        f"{len(bodies) - malformed} valid ones at the nesting limit or with a surrogate pair, "
        "on both generation routes, each followed by a valid request on the same keep-alive "
        "connection",
        "every malformed body 400 naming its field, no 500; the connection served every next "
        "request",
        {
            "malformed_bodies": malformed,
            "answered_400": sum(s == 400 for s, _, _ in got),
            "answered_500": sum(s >= 500 for s, _, _ in got),
            "next_request_200_same_connection": sum(s == 200 for s in after),
        },
    )
    assert [(s, p) for s, p, _ in got] == [(s, p) for _, _, s, p in bodies], got
    assert after == [200] * len(bodies)
    codes = {c for s, _, c in got if s == 400}
    assert codes <= {"invalid_json", "invalid_request"}, got


# Engine probes: run in the engine thread between two steps (``call_blocking``). --------------
def _close_and_wait(server, max_tokens: int, sock: socket.socket, min_tokens: int):
    """Find the request marked by ``max_tokens`` once it has ``min_tokens`` tokens (None until
    then), close its connection, and keep the engine between steps until the event loop has
    aborted it: the tokens it has then are all it will ever have, and all were delivered."""

    def probe(llm):
        seq = next((s for s in llm.engine.seqs.values() if s.params.max_tokens == max_tokens), None)
        if seq is None or len(seq.output_ids) < min_tokens:
            return None
        sock.close()
        deadline = time.monotonic() + 10
        while server.engine.outstanding:  # the loop's abort, read from this thread
            assert time.monotonic() < deadline, "the disconnect was never noticed"
            time.sleep(0.002)
        return len(seq.output_ids)

    return probe


def _send(url: str, body: dict, request_id: str) -> socket.socket:
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: {request_id}\r\n"
        f"Authorization: Bearer {KEYS['acme']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 30)
    sock.sendall(head.encode() + payload)
    return sock


def _abort_mid_generation(server, marker: int, stream: bool, request_id: str) -> int:
    body = {"model": TINY_ID, "prompt": "abort me", "max_tokens": marker, "ignore_eos": True}
    sock = _send(server.url, {**body, "temperature": 0, "stream": stream}, request_id)
    if stream:  # the status line and a first event are out
        data = b""
        while data.count(b"data: ") < 2:
            chunk = sock.recv(1 << 16)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    probe = _close_and_wait(server, marker, sock, 3)
    deadline = time.monotonic() + 30
    while (tokens := server.engine.call_blocking(probe)) is None:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.005)
    return tokens


def _log_lines(caplog, ids: set[str], timeout: float = 10.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout  # a line is written once its answer is sent
    while True:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("requests")]
        found = {x["request_id"]: x for x in lines if x["request_id"] in ids}
        if len(found) == len(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def _drain_mid_stream(llm, tmp_path: Path, request_id: str) -> str:
    """A stream still running at SIGTERM under ``DrainingServer`` (open mode, 0.3 s drain
    timeout), aborted when the drain gives up: its last event is the error. Returns the
    metrics as the app left them (the server is gone)."""
    store = open_store(tmp_path / "drain", gc_interval_s=None)
    app = create_app(AsyncEngine(lambda: llm.served, 8), store, ServeConfig(), ApiKeys())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = DrainingServer(config, app.state.ctx, drain_timeout=0.3)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 30
        while not (server.started and app.state.ctx.engine.ready):
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        body = {**SMALL, "max_tokens": 4000, "ignore_eos": True, "stream": True}
        headers = {"X-Request-ID": request_id}
        with (
            httpx.Client(base_url=url, trust_env=False, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body, headers=headers) as r,
        ):
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.handle_exit(signal.SIGTERM, None)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: ") :])["error"]["code"] == "engine_unavailable"
        thread.join(10)
        assert not thread.is_alive() and server.exit_code == 0
        return app.state.ctx.metrics.render()[0].decode()
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


def test_aborts_are_counted_and_logged(make_server, tiny_llm, caplog, tmp_path):
    server = make_server(tiny_llm, max_request_bytes=64 << 10, max_upload_bytes=128 << 10)
    prompt_tokens = len(tiny_llm.tokenizer.encode("abort me"))
    with caplog.at_level(logging.INFO, logger="prefix_serve.requests"):
        before = _metrics(server)
        tokens = {
            "ab-stream": _abort_mid_generation(server, 3001, True, "ab-stream"),
            "ab-whole": _abort_mid_generation(server, 3002, False, "ab-whole"),
        }
        server.wait_idle()
        with server.http() as http:
            # Finished requests keep their reason: 2 choices + 1 stream, 3 tokens each.
            done = {**SMALL, "max_tokens": 3, "ignore_eos": True}
            r = http.post("/v1/completions", json={**done, "n": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
            r = http.post("/v1/completions", json={**done, "stream": True})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            # Bodies over their limit, refused before routing, under the route they were for.
            big = b"x" * ((64 << 10) + 1)
            for rid, path in (("big-comp", "/v1/completions"), ("big-none", "/v1/nowhere")):
                r = http.post(path, content=big, headers={"X-Request-ID": rid})
                assert r.status_code == 413, r.text
            r = http.post(
                "/v1/adapters",
                content=b"x" * ((128 << 10) + 1),
                headers={"X-Request-ID": "big-upload", "content-type": "application/json"},
            )
            assert r.status_code == 413, r.text
        after = _metrics(server)
        # Past --request-timeout: 503, aborted mid-generation (a server of its own, with a
        # short timeout; the first one is idle and its engine thread waits).
        timing_out = make_server(tiny_llm, request_timeout=1.0)
        timeout_before = _metrics(timing_out)
        with timing_out.http() as http:
            long = {**SMALL, "max_tokens": 4000, "ignore_eos": True}
            r = http.post("/v1/completions", json=long, headers={"X-Request-ID": "ab-timeout"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
        timing_out.wait_idle()
        timeout_after = _metrics(timing_out)
        # Running when the drain gave up (a server of its own again; the others are idle).
        drained = _drain_mid_stream(tiny_llm, tmp_path, "ab-drain")
        ids = {"ab-stream", "ab-whole", "ab-timeout", "ab-drain"}
        ids |= {"big-comp", "big-none", "big-upload"}
        lines = _log_lines(caplog, ids)

    def delta(name: str) -> float:
        return _series(after, name) - _series(before, name)

    def timeout_delta(name: str) -> float:
        return _series(timeout_after, name) - _series(timeout_before, name)

    finished = "prefix_serve_requests_finished_total{finish_reason=%s}"
    timeout_tokens = lines["ab-timeout"]["generation_tokens"]
    drain_tokens = lines["ab-drain"]["generation_tokens"]
    record(
        "aborts counted and logged",
        "a stream and a non-streaming request whose clients left mid-generation, one past "
        "--request-timeout, a stream still running when the drain timed out, 3 finished "
        "choices, 3 bodies over their size limit",
        "each abort counted once as finish_reason abort and logged with the tokens it had; "
        "finished choices kept their reason; 413s logged and counted under their route",
        {
            "aborts_counted": delta(finished % '"abort"')
            + timeout_delta(finished % '"abort"')
            + _series(drained, finished % '"abort"'),
            "length_counted": delta(finished % '"length"'),
            "tokens_logged_stream": lines["ab-stream"]["generation_tokens"],
            "tokens_logged_whole": lines["ab-whole"]["generation_tokens"],
            "tokens_logged_timeout": timeout_tokens,
            "tokens_logged_drain": drain_tokens,
        },
    )
    # Every engine request counted once, by how it ended.
    reasons = ("abort", "length", "stop", "other")
    assert {r: delta(finished % f'"{r}"') for r in reasons} == {
        "abort": 2,
        "length": 3,
        "stop": 0,
        "other": 0,
    }
    assert {r: timeout_delta(finished % f'"{r}"') for r in reasons} == {
        "abort": 1,
        "length": 0,
        "stop": 0,
        "other": 0,
    }
    assert delta("prefix_serve_request_generation_tokens_count") == 5
    assert delta("prefix_serve_request_generation_tokens_sum") == (
        tokens["ab-stream"] + tokens["ab-whole"] + 3 * 3
    )
    assert timeout_delta("prefix_serve_request_generation_tokens_sum") == timeout_tokens
    error = 'prefix_serve_request_errors_total{error_type="service_unavailable_error"}'
    assert timeout_delta(error) == 1
    assert {r: _series(drained, finished % f'"{r}"') for r in reasons} == {
        "abort": 1,
        "length": 0,
        "stop": 0,
        "other": 0,
    }
    assert _series(drained, "prefix_serve_request_generation_tokens_sum") == drain_tokens
    assert _series(drained, error) == 1
    # Log lines: the tokens each aborted request had, how it ended.
    common = {"tenant": "acme", "method": "POST", "route": "/v1/completions"}
    expected = {
        "ab-stream": {**common, "status": 200, "stream": True, "error_type": None},
        "ab-whole": {**common, "status": 499, "stream": False, "error_type": None},
        "ab-timeout": {
            **common,
            "status": 503,
            "stream": False,
            "error_type": "service_unavailable_error",
        },
        "ab-drain": {
            **common,
            "tenant": "default",
            "status": 200,
            "stream": True,
            "error_type": "service_unavailable_error",
        },
    }
    assert {rid: {k: lines[rid][k] for k in fields} for rid, fields in expected.items()} == (
        expected
    )
    assert {
        rid: (lines[rid]["finish_reason"], lines[rid]["generation_tokens"])
        for rid in ("ab-stream", "ab-whole", "ab-timeout", "ab-drain")
    } == {
        "ab-stream": ("abort", tokens["ab-stream"]),
        "ab-whole": ("abort", tokens["ab-whole"]),
        "ab-timeout": ("abort", timeout_tokens),
        "ab-drain": ("abort", drain_tokens),
    }
    assert min(tokens.values()) >= 3
    assert lines["ab-stream"]["ttft_s"] is not None and lines["ab-whole"]["ttft_s"] is not None
    assert [lines[rid]["prompt_tokens"] for rid in ("ab-stream", "ab-whole")] == [prompt_tokens] * 2
    # 413s: the route they were sent to (an unknown path stays unmatched), the error type.
    big = ("big-comp", "big-none", "big-upload")
    fields = ("route", "status", "error_type", "tenant")
    assert {rid: tuple(lines[rid][k] for k in fields) for rid in big} == {
        "big-comp": ("/v1/completions", 413, "request_too_large", "-"),
        "big-none": ("unmatched", 413, "request_too_large", "-"),
        "big-upload": ("/v1/adapters", 413, "request_too_large", "-"),
    }
    http_total = 'prefix_serve_http_requests_total{route="%s",status="413"}'
    assert delta(http_total % "/v1/completions") == 1
    assert delta(http_total % "/v1/adapters") == 1
    assert delta(http_total % "other") == 1
    assert delta('prefix_serve_request_errors_total{error_type="request_too_large"}') == 3


def _metrics(server) -> str:
    with server.http(tenant=None) as ops:
        return ops.get("/metrics").text


@pytest.fixture(autouse=True)
def _quiet_httpx(caplog):
    caplog.set_level(logging.WARNING, logger="httpx")
