"""``prefix-serve bench host``: the engine's windows settled on the host with the default
model's tokenizer, the device's part replaced by drawn ids; every request gets its tokens."""

from __future__ import annotations

import pytest

from bench.host_step import run


def test_host_bench_settles_every_window_of_every_request(model_dir, data_dir, tmp_path):
    out = tmp_path / "host.json"
    result = run((3, 5), 40, 6, 21, 4, "default", str(data_dir), str(out))
    assert out.exists() and result["window"] == 4
    for r, n in zip(result["runs"], (3, 5), strict=True):
        # 21 tokens: the first from the prompt's step, 20 more in windows of 4 (timed).
        assert r["requests"] == n and r["decode_steps"] == 20
        assert r["host_ms_per_step"] > 0
        assert r["host_us_per_token"] == pytest.approx(r["host_ms_per_step"] * 1000 / n)
