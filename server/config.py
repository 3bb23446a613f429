"""Server configuration: frozen dataclasses read once from the command line and the environment.

Every ``serve`` flag ``--some-flag`` also reads ``PREFIX_SERVE_SOME_FLAG``; a flag given on the
command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store.types import check_tenant

ENV_PREFIX = "PREFIX_SERVE_"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A flag, environment variable or API-keys file that cannot be used; the message says how
    to fix it."""


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"1G"``, ``"512MiB"``, ``"2gb"`` -> bytes (powers of 1024)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 1073741824, 1GiB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use true or false)")


@dataclass(frozen=True)
class Principal:
    """Who a request acts for; the tenant is also its prefix-cache namespace."""

    tenant: str
    admin: bool = False


@dataclass(frozen=True)
class ApiKeys:
    """API key -> principal, keyed by the key's SHA-256 so keys are never compared byte by byte
    against secrets in memory (no timing side channel on the key's bytes)."""

    by_digest: Mapping[str, Principal] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.by_digest)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(p.tenant for p in self.by_digest.values())

    def lookup(self, key: str) -> Principal | None:
        return self.by_digest.get(_digest(key))

    @classmethod
    def from_entries(cls, entries: list[tuple[str, str, bool]]) -> ApiKeys:
        return cls({_digest(k): Principal(t, a) for k, t, a in entries})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeys:
        """Read ``{"keys": [{"key": "…", "tenant": "acme", "admin": false}]}``."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read --api-keys {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"--api-keys {path} is not valid JSON: {exc}") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list) or not keys:
            raise ConfigError(f'--api-keys {path}: expected {{"keys": [{{"key", "tenant"}}, …]}}')
        entries = []
        for i, entry in enumerate(keys):
            ok = isinstance(entry, dict) and all(
                isinstance(entry.get(f), str) and entry.get(f) for f in ("key", "tenant")
            )
            if not ok or not isinstance(entry.get("admin", False), bool):
                raise ConfigError(
                    f"--api-keys {path}: entry {i} needs a non-empty string 'key' and 'tenant' "
                    "(and an optional boolean 'admin')"
                )
            try:
                check_tenant(entry["tenant"])
            except ValueError as exc:
                raise ConfigError(f"--api-keys {path}: entry {i}: {exc}") from None
            entries.append((entry["key"], entry["tenant"], entry.get("admin", False)))
        if len({e[0] for e in entries}) != len(entries):
            raise ConfigError(f"--api-keys {path}: a key appears twice")
        return cls.from_entries(entries)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``prefix-serve serve`` needs. Sizes in bytes, times in seconds."""

    model: str = "default"
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "./data"
    redis_url: str | None = None
    blob_url: str | None = None
    api_keys: str | None = None  # path of the keys file; None = open single-tenant mode
    allow_unauthenticated: bool = False
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    kv_cache_memory: int = 1 << 30
    torch_threads: int | None = None  # None: the CPUs this process may use (server.cpus)
    max_queued_requests: int = 256  # accepted requests waiting beyond max_num_seqs
    # Of max_num_seqs + max_queued_requests, the most one tenant may hold when the keys file
    # names more than one tenant (1.0: no per-tenant limit).
    max_tenant_share: float = 0.5
    request_timeout: float = 600.0
    drain_timeout: float = 30.0
    max_request_bytes: int = 8 << 20  # JSON bodies
    max_upload_bytes: int = 272 << 20  # adapter uploads (256 MiB weights + room for the form)
    max_upload_memory: int = 272 << 20  # bytes of uploads parsed at once (others wait)
    log_level: str = "info"

    def check(self) -> None:
        """Refuse unsafe or impossible combinations before anything is loaded."""
        if not self.api_keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ConfigError(
                f"--host {self.host} listens beyond loopback without API keys: give --api-keys "
                "FILE, or --allow-unauthenticated to run open on purpose"
            )
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_cache_memory",
            "max_upload_memory",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("--torch-threads must be at least 1")
        if self.max_queued_requests < 0:
            raise ConfigError("--max-queued-requests must be >= 0")
        if not 0 < self.max_tenant_share <= 1:
            raise ConfigError("--max-tenant-share must be in (0, 1]")
        if self.request_timeout <= 0 or self.drain_timeout < 0:
            raise ConfigError("--request-timeout must be > 0 and --drain-timeout >= 0")
        if self.blob_url is not None:
            self._check_blob_url(self.blob_url)

    @staticmethod
    def _check_blob_url(blob_url: str) -> None:
        """The URL's form; for s3://, also the bucket itself (one request): a missing bucket,
        refused credentials or an unreachable endpoint stop the server before it loads
        anything, rather than failing every upload later."""
        from adapters_store.blobs import parse_blob_url

        try:
            if parse_blob_url(blob_url) == "s3":
                from adapters_store.s3_blobs import probe_s3_url

                probe_s3_url(blob_url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# (flag, type, help); the default comes from ServeConfig.
_FLAGS: list[tuple[str, Callable[[str], object], str]] = [
    ("model", str, "default | HF model directory | FILE.gguf"),
    ("host", str, "address to listen on"),
    ("port", int, "port to listen on"),
    ("data-dir", str, "adapters, registry and converted models live here"),
    ("redis-url", str, "registry in Redis (shared by replicas) instead of SQLite"),
    (
        "blob-url",
        str,
        "adapter blobs on a shared volume (file:///path) or in an S3-compatible bucket "
        "(s3://bucket/prefix; endpoint, region and credentials from the AWS_* environment) "
        "instead of the data dir",
    ),
    ("api-keys", str, 'JSON file {"keys": [{"key", "tenant", "admin"}]}; none = open mode'),
    ("device", str, "auto | cpu | cuda"),
    ("dtype", str, "auto | float32 | bfloat16"),
    ("max-num-seqs", int, "sequences decoded together at most"),
    ("max-num-batched-tokens", int, "tokens computed in one engine step at most"),
    ("kv-cache-memory", parse_bytes, "bytes for the KV block pool (e.g. 1GiB)"),
    (
        "torch-threads",
        int,
        "torch CPU threads (default: the CPUs this process may use, from its affinity mask "
        "and cgroup CPU quota)",
    ),
    ("max-queued-requests", int, "requests waiting beyond --max-num-seqs before 429"),
    (
        "max-tenant-share",
        float,
        "most of the running + queued requests one tenant may hold, as a fraction, when the "
        "API keys name several tenants (1: no limit)",
    ),
    ("request-timeout", float, "seconds a generation request may take"),
    ("drain-timeout", float, "seconds running requests get to finish after SIGTERM"),
    ("max-request-bytes", parse_bytes, "largest JSON request body"),
    ("max-upload-bytes", parse_bytes, "largest adapter upload body"),
    (
        "max-upload-memory",
        parse_bytes,
        "bytes of adapter uploads parsed at once; further uploads wait (then 429)",
    ),
    ("log-level", str, "uvicorn log level"),
]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``serve``; their defaults are filled in by ``config_from_args`` so the
    environment can sit between the command line and the built-in default."""
    for flag, typ, help_text in _FLAGS:
        env = ENV_PREFIX + flag.upper().replace("-", "_")
        parser.add_argument(f"--{flag}", type=typ, default=None, help=f"{help_text} [{env}]")
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_const",
        const=True,
        default=None,
        help="listen beyond loopback with no API keys [PREFIX_SERVE_ALLOW_UNAUTHENTICATED]",
    )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeConfig:
    """Command line > ``PREFIX_SERVE_*`` environment > ``ServeConfig`` defaults."""
    values: dict[str, object] = {}
    types = {f.replace("-", "_"): t for f, t, _ in _FLAGS}
    types["allow_unauthenticated"] = parse_bool
    for name, typ in types.items():
        value = getattr(args, name, None)
        env = ENV_PREFIX + name.upper()
        if value is None and environ.get(env, "") != "":
            try:
                value = typ(environ[env])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{env}={environ[env]!r}: {exc}") from None
        if value is not None:
            values[name] = value
    config = ServeConfig(**values)  # type: ignore[arg-type]
    config.check()
    return config
