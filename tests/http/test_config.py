"""``prefix-serve serve`` flags: every flag also from ``PREFIX_SERVE_<FLAG>``, the command line
wins, a non-loopback host without API keys is refused; the API-keys file."""

from __future__ import annotations

import argparse
import json

import pytest

from server import cpus
from server.api.server import torch_threads
from server.cli import main
from server.config import (
    _FLAGS,
    ApiKeys,
    ConfigError,
    Principal,
    ServeConfig,
    add_serve_arguments,
    config_from_args,
    is_loopback,
    parse_bytes,
)


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv), env or {})


def test_defaults_match_api_md():
    c = parse([])
    assert (c.model, c.host, c.port, c.data_dir) == ("default", "127.0.0.1", 8000, "./data")
    assert (c.redis_url, c.blob_url, c.api_keys, c.device, c.dtype) == (
        None, None, None, "auto", "auto",
    )  # fmt: skip


def test_every_flag_reads_its_environment_variable(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "k", "tenant": "t"}]}))
    env = {
        "PREFIX_SERVE_MODEL": "/models/x",
        "PREFIX_SERVE_HOST": "0.0.0.0",
        "PREFIX_SERVE_PORT": "9001",
        "PREFIX_SERVE_DATA_DIR": "/srv/data",
        "PREFIX_SERVE_REDIS_URL": "redis://r:6379/0",
        "PREFIX_SERVE_BLOB_URL": "file:///blobs",
        "PREFIX_SERVE_API_KEYS": str(keys),
        "PREFIX_SERVE_DEVICE": "cpu",
        "PREFIX_SERVE_DTYPE": "bfloat16",
        "PREFIX_SERVE_MAX_NUM_SEQS": "7",
        "PREFIX_SERVE_MAX_NUM_BATCHED_TOKENS": "333",
        "PREFIX_SERVE_KV_CACHE_MEMORY": "2GiB",
        "PREFIX_SERVE_TORCH_THREADS": "3",
        "PREFIX_SERVE_MAX_QUEUED_REQUESTS": "5",
        "PREFIX_SERVE_MAX_TENANT_SHARE": "0.25",
        "PREFIX_SERVE_MAX_UPLOAD_MEMORY": "64MiB",
        "PREFIX_SERVE_REQUEST_TIMEOUT": "12.5",
        "PREFIX_SERVE_DRAIN_TIMEOUT": "3",
        "PREFIX_SERVE_MAX_REQUEST_BYTES": "1M",
        "PREFIX_SERVE_MAX_UPLOAD_BYTES": "10MiB",
        "PREFIX_SERVE_LOG_LEVEL": "debug",
    }
    assert {f"PREFIX_SERVE_{f.upper().replace('-', '_')}" for f, _, _ in _FLAGS} == set(env)
    c = parse([], env)
    assert (c.model, c.host, c.port, c.data_dir) == ("/models/x", "0.0.0.0", 9001, "/srv/data")
    assert (c.redis_url, c.blob_url, c.api_keys) == ("redis://r:6379/0", "file:///blobs", str(keys))
    assert (c.device, c.dtype) == ("cpu", "bfloat16")
    assert (c.max_num_seqs, c.max_num_batched_tokens) == (7, 333)
    assert (c.kv_cache_memory, c.max_queued_requests, c.torch_threads) == (2 << 30, 5, 3)
    assert (c.max_tenant_share, c.max_upload_memory) == (0.25, 64 << 20)
    assert (c.request_timeout, c.drain_timeout) == (12.5, 3.0)
    assert (c.max_request_bytes, c.max_upload_bytes, c.log_level) == (1 << 20, 10 << 20, "debug")
    # The command line wins over the environment.
    assert parse(["--port", "9002", "--host", "127.0.0.2"], env).port == 9002
    flag = parse([], {"PREFIX_SERVE_HOST": "0.0.0.0", "PREFIX_SERVE_ALLOW_UNAUTHENTICATED": "1"})
    assert flag.allow_unauthenticated


def test_non_loopback_without_keys_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        parse(["--host", "0.0.0.0"])
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-keys" in capsys.readouterr().err
    assert parse(["--host", "0.0.0.0", "--allow-unauthenticated"]).allow_unauthenticated
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "k", "tenant": "t"}]}))
    assert parse(["--host", "10.1.2.3", "--api-keys", str(keys)]).host == "10.1.2.3"
    assert [is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "example.com", "10.0.0.1")] == [False] * 4


def test_torch_threads_default_to_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 5)
    assert torch_threads(parse([])) == 5
    assert torch_threads(parse(["--torch-threads", "2"])) == 2
    with pytest.raises(ConfigError, match="--torch-threads"):
        parse(["--torch-threads", "0"])


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="PREFIX_SERVE_PORT"):
        parse([], {"PREFIX_SERVE_PORT": "eighty"})
    with pytest.raises(ConfigError, match="max-num-seqs"):
        parse(["--max-num-seqs", "0"])
    assert [parse_bytes(s) for s in ("1024", "1k", "1.5MiB", "2gb", "1G")] == [
        1024, 1024, 3 << 19, 2 << 30, 1 << 30,
    ]  # fmt: skip


def test_api_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": "sk-a", "tenant": "acme"},
                    {"key": "sk-root", "tenant": "ops", "admin": True},
                ]
            }
        )
    )
    keys = ApiKeys.load(path)
    assert keys.lookup("sk-a") == Principal("acme", False)
    assert keys.lookup("sk-root") == Principal("ops", True)
    assert keys.lookup("sk-b") is None and keys.enabled
    bad = [
        "not json",
        json.dumps({"keys": []}),
        json.dumps({"keys": [{"key": "k"}]}),
        json.dumps({"keys": [{"key": "k", "tenant": "t", "admin": "yes"}]}),
        json.dumps({"keys": [{"key": "k", "tenant": "t"}, {"key": "k", "tenant": "u"}]}),
        json.dumps({"keys": [{"key": "k", "tenant": "has space"}]}),
    ]
    for text in bad:
        path.write_text(text)
        with pytest.raises(ConfigError):
            ApiKeys.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing.json")
