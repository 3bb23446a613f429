"""Every error path answers OpenAI's error shape with the status docs/api.md gives (tiny random
model)."""

from __future__ import annotations

import openai
import pytest
from http_helpers import TINY_ID, error_of


@pytest.fixture
def server(make_server, tiny_llm):
    return make_server(tiny_llm, max_request_bytes=64 << 10)


def test_auth_missing_or_unknown_key_is_401(server):
    with server.http(tenant=None) as http:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5"}):
            for method, path in (
                ("GET", "/v1/models"),
                ("POST", "/v1/completions"),
                ("GET", "/v1/adapters"),
                ("GET", "/v1/adapters/x"),
                ("DELETE", "/v1/adapters/x"),
                ("POST", "/v1/adapters"),
                ("POST", "/v1/chat/completions"),
            ):
                r = http.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, r.text)
                assert error_of(r)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        server.openai(tenant="nobody").models.list()


def test_the_key_is_checked_before_the_body_is_read(server):
    """Without a key, a malformed body still answers 401 (found by tests/reliability/
    test_schema.py: FastAPI parsed a body parameter before the auth dependency ran)."""
    with server.http(tenant=None) as http:
        for path in ("/v1/completions", "/v1/chat/completions"):
            for body in (b"{not json", b"\xff\xfe", b'{"model": 5}'):
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 401, (path, body, r.text)
    with server.http() as http:  # with one, the same bodies are 400
        r = http.post("/v1/completions", content=b"\xff\xfe")
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
        r = http.post("/v1/completions", content=b"{}", headers={"Content-Type": "text/plain"})
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_request"


def test_ops_routes_need_no_key(server):
    with server.http(tenant=None) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").json() == {"status": "ready"}
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "prefix_serve_http_requests_total" in metrics.text
        assert "key-acme" not in metrics.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": TINY_ID, "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": TINY_ID, "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": TINY_ID, "prompt": "x", "n": 0}, "n"),
        ({"model": TINY_ID, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": TINY_ID, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"model": TINY_ID, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": TINY_ID, "prompt": "x", "top_k": -2}, "top_k"),
        ({"model": TINY_ID, "prompt": []}, None),
        ({"model": TINY_ID}, "prompt"),
        ({"prompt": "x"}, "model"),
        ({"model": TINY_ID, "prompt": "x", "stop": [""]}, None),
        ({"model": TINY_ID, "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": TINY_ID, "prompt": "x", "echo": 1}, "echo"),
        ({"model": TINY_ID, "prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"model": TINY_ID, "prompt": [[1, 2], [3, 10**9]]}, "prompt"),
        ({"model": TINY_ID, "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
        ({"model": TINY_ID, "prompt": "x", "n": 1, "best_of": 5}, None),
    ],
)
def test_invalid_completion_requests_are_400(server, body, param):
    with server.http() as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


def test_invalid_chat_requests_are_400(server):
    bad = [
        {"model": TINY_ID, "messages": []},
        {"model": TINY_ID, "messages": [{"role": "wizard", "content": "x"}]},
        {"model": TINY_ID, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"model": TINY_ID, "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
    ]
    with server.http() as http:
        for body in bad:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            error_of(r)
        # As OpenAI's API: content may be missing or null only on an assistant turn.
        for role in ("system", "developer", "user"):
            for message in ({"role": role}, {"role": role, "content": None}):
                r = http.post(
                    "/v1/chat/completions", json={"model": TINY_ID, "messages": [message]}
                )
                assert r.status_code == 400, (message, r.text)
                assert error_of(r)["message"] == (
                    f"messages.0.content: required for a {role} message (a string or a list "
                    "of text parts)"
                ), r.text
        turns = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "b"},
        ]
        body = {"model": TINY_ID, "messages": turns, "max_tokens": 1}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        r = http.post(
            "/v1/chat/completions",
            content=b'{"model": "x", "messages": [',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


def test_prompt_longer_than_the_context_is_400(server, tiny_llm):
    too_long = list(range(5, 5 + tiny_llm.engine.max_model_len))
    with pytest.raises(openai.BadRequestError) as info:
        server.openai().completions.create(model=TINY_ID, prompt=too_long, max_tokens=1)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "prompt"
    # And in a stream: still a 400 status, before any event.
    with server.http() as http:
        r = http.post(
            "/v1/completions", json={"model": TINY_ID, "prompt": too_long, "stream": True}
        )
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    # A prompt that fits, with a max_tokens that does not: that one is named.
    with pytest.raises(openai.BadRequestError) as info:
        server.openai().completions.create(model=TINY_ID, prompt=too_long[:-5], max_tokens=9)
    assert info.value.body["param"] == "max_tokens"
    server.wait_idle()


def test_unknown_model_or_adapter_is_404(server):
    client = server.openai()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model=TINY_ID,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"adapters": ["missing"]},
        )
    assert info.value.body["param"] == "adapters"
    with server.http() as http:
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
        r = http.put("/v1/completions", json={})
        assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_body_too_large_is_413_before_parsing(server):
    big = b'{"model": "' + b"x" * (70 << 10) + b'", "prompt": "x"}'
    with server.http() as http:
        r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"

        def chunks():  # no Content-Length: chunked transfer, counted as it arrives
            for _ in range(100):
                yield b"x" * 1024

        r = http.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"
        # Even unauthenticated: the size is checked first, the body is never read.
        r = http.post("/v1/completions", content=big, headers={"Authorization": "Bearer bad"})
        assert r.status_code == 413


def test_open_mode_needs_no_key(make_server, tiny_llm):
    server = make_server(tiny_llm, keys=None)
    with server.http(tenant=None) as http:
        r = http.post(
            "/v1/completions",
            json={"model": TINY_ID, "prompt": "hi", "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200
        r = http.post("/v1/adapters", json={"name": "sys", "text": "Be brief."})
        assert r.status_code == 201 and r.json()["owned_by"] == "default"
