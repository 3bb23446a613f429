"""/metrics of a real server after real requests: request histograms, error counters, the
HTTP counter, and X-Request-ID echoed (the client's when safe, else one made here)."""

from __future__ import annotations

import json
import logging
import re
import time

from http_helpers import TINY_ID


def series(text: str, name: str) -> float:
    """A sample's value; 0 for a labelled series not created yet."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_requests_errors_and_echo_request_ids(make_server, tiny_llm):
    server = make_server(tiny_llm)
    body = {
        "model": TINY_ID,
        "prompt": "Hello there",
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    with server.http() as http:
        before = http.get("/metrics").text
        for _ in range(3):
            r = http.post("/v1/completions", json=body, headers={"X-Request-ID": "job-7.a"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "job-7.a"
        bad = http.post(
            "/v1/completions",
            json={**body, "max_tokens": -1},
            headers={"X-Request-ID": "no spaces allowed"},
        )
        assert bad.status_code == 400
        made = bad.headers["x-request-id"]
        assert made != "no spaces allowed" and re.fullmatch(r"[A-Za-z0-9._-]{1,128}", made)
        after = http.get("/metrics").text
    ttft = "prefix_serve_time_to_first_token_seconds_count"
    assert series(after, ttft) - series(before, ttft) == 3
    itl = "prefix_serve_inter_token_latency_seconds_count"
    assert series(after, itl) - series(before, itl) == 3 * 3  # 4 tokens: 3 gaps each
    finished = 'prefix_serve_requests_finished_total{finish_reason="length"}'
    assert series(after, finished) - series(before, finished) == 3
    errors = 'prefix_serve_request_errors_total{error_type="invalid_request_error"}'
    assert series(after, errors) - series(before, errors) == 1
    http_ok = 'prefix_serve_http_requests_total{route="/v1/completions",status="200"}'
    assert series(after, http_ok) - series(before, http_ok) == 3


def test_one_json_log_line_per_request(make_server, tiny_llm, caplog):
    server = make_server(tiny_llm)
    body = {
        "model": TINY_ID,
        "prompt": "Hello there",
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
    }
    with caplog.at_level(logging.INFO, logger="prefix_serve.requests"), server.http() as http:
        r = http.post("/v1/completions", json=body, headers={"X-Request-ID": "log-1"})
        assert r.status_code == 200
        line = None
        deadline = time.monotonic() + 5  # the line is written after the response is sent
        while line is None and time.monotonic() < deadline:
            records = [rec for rec in caplog.records if rec.name == "prefix_serve.requests"]
            lines = [json.loads(rec.getMessage()) for rec in records]
            line = next((x for x in lines if x["request_id"] == "log-1"), None)
            time.sleep(0.01)
    assert line is not None
    usage = r.json()["usage"]
    assert (line["tenant"], line["method"], line["route"], line["status"]) == (
        "acme",
        "POST",
        "/v1/completions",
        200,
    )
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["generation_tokens"] == usage["completion_tokens"] == 3
    assert line["finish_reason"] == "length" and line["stream"] is False
    assert 0 < line["ttft_s"] <= line["e2e_s"]
    assert "Hello" not in json.dumps(line)  # no prompt text in the log
