"""The registry: adapter metadata, one row per version. SQLite (embedded, the default) here;
Redis (shared by replicas) in ``redis_registry.py``. Both pass tests/store's contract suite.

Model, the same for both backends:
- a *version* is an ``AdapterRecord``; versions of a (tenant, name) are numbered 1, 2, ... in
  commit order, never reused (not even after a delete);
- at most one version of a name is *live* (the newest, unless the name was deleted); ``get``
  and ``list`` see live versions only. Committing a version hides the previous live one;
  ``hide`` hides the live one. Hidden versions stay (``versions``) until ``purge_hidden``;
- a blob is *referenced* while any retained version, live or hidden, names its sha256;
- a tenant's *usage* is its live adapter count and the stored bytes of every retained version,
  live or hidden (each version its own ``size_bytes``): what the quota checks. A hidden
  version's bytes are freed when ``purge_hidden`` forgets it, not when it is hidden, so
  re-uploading or deleting cannot store more than the quota before collection.
Torch-free.
"""

from __future__ import annotations

import builtins
import os
import secrets
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from adapters_store.types import (
    AdapterNotFound,
    AdapterRecord,
    Quota,
    QuotaExceeded,
    RegistryUnavailable,
    TenantUsage,
)


@dataclass(frozen=True)
class Change:
    """A change announced by another process. ``event`` is "put" or "delete", or "reset"
    (tenant and name empty) after announcements may have been missed: any name may have
    changed. ``replaced_sha256``: content of the version that stopped being live, if any."""

    event: str
    tenant: str = ""
    name: str = ""
    replaced_sha256: str | None = None


EventHandler = Callable[[Change], None]


@dataclass(frozen=True)
class NewVersion:
    """What an upload commits; the registry adds id, version and created."""

    tenant: str
    name: str
    kind: str
    num_virtual_tokens: int
    sha256: str
    size_bytes: int


class Registry(ABC):
    """Metadata of every adapter version. Every method may raise RegistryUnavailable."""

    def begin(self) -> float:
        """Start a put: check the registry answers, return a token for ``commit``."""
        return 0.0

    @abstractmethod
    def commit(
        self, new: NewVersion, quota: Quota, now: float, token: float
    ) -> tuple[AdapterRecord, str | None]:
        """Atomically: check ``quota`` for the tenant as it will be after this version (live
        count, and stored bytes of every retained version: the previous live one, now hidden,
        still counts), assign the next version number, hide the previous live version, store
        the new one. Returns it and the hidden version's sha256 (None if the name had no live
        version). QuotaExceeded leaves everything unchanged."""

    @abstractmethod
    def get(self, tenant: str, name: str) -> AdapterRecord:
        """The live version; AdapterNotFound if none."""

    @abstractmethod
    def list(self, tenant: str) -> list[AdapterRecord]:
        """The live version of each of the tenant's names, sorted by name."""

    @abstractmethod
    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:
        """Every retained version of the name (live and hidden), by ascending version."""

    @abstractmethod
    def hide(self, tenant: str, name: str, now: float) -> AdapterRecord:
        """Hide the live version (returned); AdapterNotFound if none. Its bytes stay counted
        in the tenant's usage until it is purged."""

    @abstractmethod
    def usage(self, tenant: str) -> tuple[int, int]:
        """(live adapter count, stored bytes of every retained version, live and hidden)."""

    @abstractmethod
    def tenants(self) -> builtins.list[TenantUsage]:
        """The usage of every tenant holding a live adapter or a retained version, sorted by
        tenant."""

    @abstractmethod
    def purge_hidden(self, older_than: float) -> int:
        """Forget versions hidden before ``older_than`` (unix seconds), freeing their bytes in
        their tenants' usage; returns how many."""

    @abstractmethod
    def referenced(self) -> set[str]:
        """The sha256 of every retained version."""

    @abstractmethod
    def is_referenced(self, sha256: str) -> bool: ...

    def ping(self) -> bool:
        """True if the registry answers now (for /ready)."""
        try:
            self.usage("\x00ping")
        except RegistryUnavailable:
            return False
        return True

    def watch(self, handler: EventHandler) -> None:
        """Deliver other processes' changes to ``handler`` (from a background thread). A
        registry of one process (SQLite) never calls it."""
        return None

    def watching(self) -> bool:
        """True while announcements are being received, so a name -> version mapping kept
        since the last "reset" event is current."""
        return False

    def close(self) -> None:
        """Release connections and stop background threads."""
        return None


def new_id() -> str:
    return "adp-" + secrets.token_hex(12)


def check_quota(quota: Quota, tenant: str, count: int, total_bytes: int) -> None:
    """Raise QuotaExceeded if ``count`` live adapters or ``total_bytes`` stored (every retained
    version) would pass ``quota``."""
    if count > quota.max_adapters:
        raise QuotaExceeded(
            f"tenant {tenant!r} would have {count} adapters; the limit is {quota.max_adapters} "
            "(delete one first)"
        )
    if total_bytes > quota.max_total_bytes:
        raise QuotaExceeded(
            f"tenant {tenant!r} would store {total_bytes} bytes of adapters; the limit is "
            f"{quota.max_total_bytes} bytes (a replaced or deleted version counts until it is "
            "collected, a grace period after: delete adapters, then retry once they are)"
        )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    num_virtual_tokens INTEGER NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created INTEGER NOT NULL,
    hidden_at REAL,
    UNIQUE (tenant, name, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS live ON adapters (tenant, name) WHERE hidden_at IS NULL;
CREATE INDEX IF NOT EXISTS by_sha ON adapters (sha256);
CREATE INDEX IF NOT EXISTS by_hidden ON adapters (hidden_at) WHERE hidden_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS names (
    tenant TEXT NOT NULL, name TEXT NOT NULL, last_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT PRIMARY KEY, count INTEGER NOT NULL, bytes INTEGER NOT NULL
);
"""
# PRAGMA user_version: 0, usage.bytes counted live versions only; 1, every retained version.
_USER_VERSION = 1
_COLUMNS = "id, tenant, name, kind, num_virtual_tokens, version, sha256, size_bytes, created"


class SQLiteRegistry(Registry):
    """One SQLite file in WAL mode. Safe for concurrent writers in separate processes: every
    write is one ``BEGIN IMMEDIATE`` transaction (version numbers and quota checks inside it);
    a writer waits up to ``busy_timeout_s`` for the lock, then RegistryUnavailable."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()  # sqlite3 connections are per thread
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        with self._errors():
            self._db().executescript(_SCHEMA)
        self._upgrade()

    def commit(
        self, new: NewVersion, quota: Quota, now: float, token: float
    ) -> tuple[AdapterRecord, str | None]:
        with self._write() as db:
            prev = db.execute(
                "SELECT sha256 FROM adapters WHERE tenant = ? AND name = ? AND hidden_at IS NULL",
                (new.tenant, new.name),
            ).fetchone()
            count, total = self._usage(db, new.tenant)
            count += 0 if prev else 1
            total += new.size_bytes  # the previous version, hidden, still counts
            check_quota(quota, new.tenant, count, total)
            (version,) = db.execute(
                "INSERT INTO names VALUES (?, ?, 1) ON CONFLICT (tenant, name) "
                "DO UPDATE SET last_version = last_version + 1 RETURNING last_version",
                (new.tenant, new.name),
            ).fetchone()
            db.execute(
                "UPDATE adapters SET hidden_at = ? WHERE tenant = ? AND name = ? "
                "AND hidden_at IS NULL",
                (now, new.tenant, new.name),
            )
            record = AdapterRecord(
                id=new_id(),
                tenant=new.tenant,
                name=new.name,
                kind=new.kind,
                num_virtual_tokens=new.num_virtual_tokens,
                version=version,
                sha256=new.sha256,
                size_bytes=new.size_bytes,
                created=int(now),
            )
            db.execute(
                f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                astuple(record),
            )
            self._set_usage(db, new.tenant, count, total)
            return record, prev[0] if prev else None

    def get(self, tenant: str, name: str) -> AdapterRecord:
        row = self._one(
            f"SELECT {_COLUMNS} FROM adapters WHERE tenant = ? AND name = ? AND hidden_at IS NULL",
            (tenant, name),
        )
        if row is None:
            raise AdapterNotFound(f"adapter {name!r} not found")
        return AdapterRecord(*row)

    def list(self, tenant: str) -> list[AdapterRecord]:
        rows = self._all(
            f"SELECT {_COLUMNS} FROM adapters WHERE tenant = ? AND hidden_at IS NULL ORDER BY name",
            (tenant,),
        )
        return [AdapterRecord(*row) for row in rows]

    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:
        rows = self._all(
            f"SELECT {_COLUMNS} FROM adapters WHERE tenant = ? AND name = ? ORDER BY version",
            (tenant, name),
        )
        return [AdapterRecord(*row) for row in rows]

    def hide(self, tenant: str, name: str, now: float) -> AdapterRecord:
        with self._write() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM adapters WHERE tenant = ? AND name = ? "
                "AND hidden_at IS NULL",
                (tenant, name),
            ).fetchone()
            if row is None:
                raise AdapterNotFound(f"adapter {name!r} not found")
            record = AdapterRecord(*row)
            db.execute("UPDATE adapters SET hidden_at = ? WHERE id = ?", (now, record.id))
            count, total = self._usage(db, tenant)
            self._set_usage(db, tenant, count - 1, total)  # bytes freed when purged
            return record

    def usage(self, tenant: str) -> tuple[int, int]:
        with self._errors():
            return self._usage(self._db(), tenant)

    def tenants(self) -> builtins.list[TenantUsage]:
        rows = self._all(
            "SELECT tenant, count, bytes FROM usage WHERE count > 0 OR bytes > 0 ORDER BY tenant",
            (),
        )
        return [TenantUsage(*row) for row in rows]

    def purge_hidden(self, older_than: float) -> int:
        with self._write() as db:
            freed = db.execute(
                "SELECT tenant, SUM(size_bytes) FROM adapters WHERE hidden_at IS NOT NULL "
                "AND hidden_at < ? GROUP BY tenant",
                (older_than,),
            ).fetchall()
            purged = db.execute(
                "DELETE FROM adapters WHERE hidden_at IS NOT NULL AND hidden_at < ?",
                (older_than,),
            ).rowcount
            db.executemany(
                "UPDATE usage SET bytes = bytes - ? WHERE tenant = ?",
                [(total, tenant) for tenant, total in freed],
            )
            return purged

    def referenced(self) -> set[str]:
        return {sha for (sha,) in self._all("SELECT DISTINCT sha256 FROM adapters", ())}

    def is_referenced(self, sha256: str) -> bool:
        return self._one("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha256,)) is not None

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    # -- internals

    def _upgrade(self) -> None:
        """Bring a registry file written before ``_USER_VERSION`` up to date: its usage rows
        counted live versions only, so they are recomputed from the versions it retains. Once
        per file; the check is repeated inside the write lock, so concurrent openers agree."""
        with self._errors():
            (found,) = self._db().execute("PRAGMA user_version").fetchone()
        if found >= _USER_VERSION:
            return
        with self._write() as db:
            (found,) = db.execute("PRAGMA user_version").fetchone()
            if found >= _USER_VERSION:
                return
            db.execute("DELETE FROM usage")
            db.execute(
                "INSERT INTO usage (tenant, count, bytes) SELECT tenant, "
                "SUM(hidden_at IS NULL), SUM(size_bytes) FROM adapters GROUP BY tenant"
            )
            db.execute(f"PRAGMA user_version = {_USER_VERSION}")

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,  # closed from close(), on another thread
            )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # a commit survives power loss too
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk I/O
            raise RegistryUnavailable(f"adapter registry (SQLite) unavailable: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._errors():
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _one(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        with self._errors():
            row: tuple[Any, ...] | None = self._db().execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, args: tuple[object, ...]) -> builtins.list[tuple[Any, ...]]:
        with self._errors():
            return self._db().execute(sql, args).fetchall()

    @staticmethod
    def _usage(db: sqlite3.Connection, tenant: str) -> tuple[int, int]:
        row = db.execute("SELECT count, bytes FROM usage WHERE tenant = ?", (tenant,)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    @staticmethod
    def _set_usage(db: sqlite3.Connection, tenant: str, count: int, total: int) -> None:
        db.execute(
            "INSERT INTO usage VALUES (?, ?, ?) ON CONFLICT (tenant) "
            "DO UPDATE SET count = excluded.count, bytes = excluded.bytes",
            (tenant, count, total),
        )
