"""server/request_log.py: the per-request JSON line and the X-Request-ID rule."""

from __future__ import annotations

import json
import logging

import pytest
from starlette.datastructures import Headers

from server.request_log import RequestLog, format_request_log, log_request, request_id_from

RECORD = RequestLog(
    request_id="req-1",
    tenant="acme",
    method="POST",
    route="/v1/chat/completions",
    status=200,
    adapter_ids=("ad-persona", "ad-task"),
    prompt_tokens=40,
    cached_tokens=32,
    generation_tokens=7,
    finish_reason="stop",
    stream=True,
    queue_s=0.0012345678,
    ttft_s=0.05,
    e2e_s=0.4,
)


def test_one_json_line_with_every_field() -> None:
    line = format_request_log(RECORD, now=1_700_000_000.25)
    assert "\n" not in line
    assert json.loads(line) == {
        "ts": "2023-11-14T22:13:20.250Z",
        "event": "request",
        "request_id": "req-1",
        "tenant": "acme",
        "method": "POST",
        "route": "/v1/chat/completions",
        "status": 200,
        "adapter_ids": ["ad-persona", "ad-task"],
        "prompt_tokens": 40,
        "cached_tokens": 32,
        "generation_tokens": 7,
        "finish_reason": "stop",
        "error_type": None,
        "stream": True,
        "queue_s": 0.001235,
        "ttft_s": 0.05,
        "e2e_s": 0.4,
    }


def test_a_value_with_newlines_stays_on_one_line() -> None:
    odd = RequestLog("req-2", "acme", "GET", 'other\n{"forged": 1}', 404, error_type="x\r\ny")
    line = format_request_log(odd, now=0.0)
    assert "\n" not in line and "\r" not in line
    assert json.loads(line)["route"] == 'other\n{"forged": 1}'


def test_log_request_writes_info_and_warning_for_5xx(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="prefix_serve.requests"):
        log_request(RECORD)
        log_request(RequestLog("req-3", "acme", "POST", "/v1/completions", 500, error_type="x"))
    assert [(r.name, r.levelno) for r in caplog.records] == [
        ("prefix_serve.requests", logging.INFO),
        ("prefix_serve.requests", logging.WARNING),
    ]
    assert json.loads(caplog.records[1].getMessage())["status"] == 500


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123_X.y", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("has space", False),
        ("new\nline", False),
        ("é", False),
        ("../../etc", False),
    ],
)
def test_request_id_is_the_clients_only_when_safe(sent: str, kept: bool) -> None:
    got = request_id_from(Headers(headers={"x-request-id": sent}))
    assert (got == sent) is kept
    if not kept:
        assert got.startswith("req-") and len(got) == 36


def test_request_id_header_name_is_case_insensitive_and_ids_are_unique() -> None:
    assert request_id_from({"X-Request-Id": "abc"}) == "abc"
    assert request_id_from([("X-REQUEST-ID", "abc")]) == "abc"
    assert request_id_from([(b"x-request-id", b"abc")]) == "abc"  # an ASGI scope's headers
    assert request_id_from([(b"x-request-id", "é".encode())]).startswith("req-")
    made = {request_id_from({}) for _ in range(100)}
    assert len(made) == 100
