"""``bench w3``'s logic on the CPU with a small Llama (its GPU run is in tests/gpu and the
device script): every variant finishes every request, the floor is the hand-counted bytes over
the bandwidth, the peers run in the same call."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from bench.w3 import VIRTUAL_TOKENS, format_result, run

CONFIG = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def test_w3_runs_every_variant_and_counts_its_floor(tmp_path):
    import torch

    out = tmp_path / "w3.json"
    result = run(4, 40, 8, 6, json_path=str(out), device="cpu", config=CONFIG, dtype=torch.float32)
    assert out.exists()
    runs = {r["variant"]: r for r in result["engine"]}
    assert set(runs) == {"shared", "distinct", "shared-long"}
    kv = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv heads * head_dim * float32 bytes
    assert result["kv_bytes_per_token"] == kv
    # tied embeddings: 256 x 64 once; per layer q, k, v, o (64x64, 64x32 twice, 64x64), the
    # MLP (3 x 64 x 128) and two norms; the final norm
    params = 256 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert result["weight_bytes"] == params * 4
    bw = result["bandwidth_bytes_per_s"]
    for name, tenants, prefix in (("shared", 1, 40), ("distinct", 4, 40), ("shared-long", 1, 160)):
        r = runs[name]
        assert r["requests"] == 4 and r["new_tokens"] == 6
        assert r["tok_per_s"] == pytest.approx(24 / r["seconds"])
        own = 4 * (8 + 6 / 2) * kv
        want = (params * 4 + own + tenants * (VIRTUAL_TOKENS + prefix) * kv) / bw
        assert r["floor_ms_per_step"] == pytest.approx(want * 1000)
        no_share = (params * 4 + own + 4 * (VIRTUAL_TOKENS + prefix) * kv) / bw
        assert r["floor_no_sharing_ms_per_step"] == pytest.approx(no_share * 1000)
        parts = r["step_parts_ms"]
        assert set(parts) == {"schedule", "forward", "sample", "rest"}
        assert all(v >= 0 for v in parts.values()) and parts["forward"] > 0
        # medians of parts of the same steps: together about one step (each <= the longest)
        assert sum(parts.values()) == pytest.approx(r["decode_ms_per_step"], rel=0.5)
    assert result["cold_load"]["adapters"] == 4
    for peer in ("peft_generate", "transformers_generate_batch"):
        assert result[peer].get("generated") == 24, result[peer]
    assert "shared" in format_result(result)
