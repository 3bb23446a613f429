"""A real Prometheus (the Debian package's binary) scrapes ``Metrics.render()`` served by a
small FastAPI app under uvicorn, and its query API returns exactly what was observed."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from ops_helpers import tool

from server.metrics import Metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value is not None:
                return value
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def served_metrics() -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics()
    app = FastAPI()

    @app.get("/metrics")
    def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or None, 10, "uvicorn")
    yield metrics, port
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def prometheus(served_metrics, tmp_path: Path) -> Iterator[str]:
    _, target = served_metrics
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: prefix-serve\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
    )
    url = f"http://127.0.0.1:{port}"
    args = [
        tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]

    def ready() -> bool | None:
        with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
            return response.status == 200 or None

    with (tmp_path / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for(ready, 20, "prometheus to be ready")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query(url: str, promql: str) -> list[dict]:
    body = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar_after(url: str, promql: str, want: str, timeout: float = 30) -> str:
    """The query's single value once it equals ``want`` (a later scrape), else its last."""
    last: list[str] = []

    def check():
        result = query(url, promql)
        if len(result) == 1:
            last[:] = [result[0]["value"][1]]
            return last[0] if last[0] == want else None
        return None

    try:
        return wait_for(check, timeout, promql)
    except AssertionError:
        return last[0] if last else "no result"


def test_prometheus_scrapes_exact_counts(served_metrics, prometheus: str) -> None:
    metrics, _ = served_metrics
    for ttft in (0.02, 0.03, 0.3):
        metrics.observe_request(ttft, [0.01, 0.01], ttft + 0.02, 0.001, "stop", 10, 3)
    metrics.count_error("overloaded_error")

    ttft_count = "prefix_serve_time_to_first_token_seconds_count"
    assert scalar_after(prometheus, ttft_count, "3") == "3"
    assert scalar_after(prometheus, 'up{job="prefix-serve"}', "1") == "1"
    (target,) = get_json(prometheus + "/api/v1/targets")["data"]["activeTargets"]
    assert (target["health"], target["lastError"]) == ("up", "")
    assert query(prometheus, "prefix_serve_inter_token_latency_seconds_count")[0]["value"][1] == "6"
    assert (
        query(prometheus, 'prefix_serve_time_to_first_token_seconds_bucket{le="0.04"}')[0]["value"][
            1
        ]
        == "2"
    )
    errors = query(prometheus, 'prefix_serve_request_errors_total{error_type="overloaded_error"}')
    assert errors[0]["value"][1] == "1"

    # A later observation reaches Prometheus on the next scrape.
    metrics.observe_request(None, [], 0.5, None, "abort", 4, 0)
    assert scalar_after(prometheus, ttft_count, "3") == "3"  # no first token: not observed
    finished = 'sum(prefix_serve_requests_finished_total{finish_reason=~"stop|abort"})'
    assert scalar_after(prometheus, finished, "4") == "4"
