"""The registry in Redis, shared by every replica (see ``registry.py`` for the model).

Keys, under a prefix (default ``prefix-serve:``); records are JSON ``AdapterRecord`` fields:

    live:<tenant>              hash  name -> live record (what get/list read: one round trip)
    ver:<tenant>:<name>        hash  version -> record, every retained version
    last:<tenant>              hash  name -> last version number given (never reused)
    usage:<tenant>             hash  count and bytes of live versions, hidden: bytes of hidden
                                     versions not yet purged (the quota counts bytes + hidden)
    hidden                     zset  [tenant, name, version, size_bytes] by the time it was
                                     hidden; the size says its bytes are in usage's ``hidden``
    refs                       hash  sha256 -> retained versions naming it (blob collection)

A hidden-set member without a size (written before hidden versions were counted) is purged
without touching ``hidden``: it was never added there.

Every write is one Lua script, so version numbers, quota checks and the announcement on the
channel ``prefix-serve:adapters`` are atomic with the change. Each call fails within
``2 * timeout_s`` (one connect, one read) with RegistryUnavailable; after a failure, calls fail
at once for ``retry_interval_s`` rather than each waiting out the timeout again.
"""

from __future__ import annotations

import builtins
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from adapters_store.registry import (
    Change,
    EventHandler,
    NewVersion,
    Registry,
    check_quota,
    new_id,
)
from adapters_store.types import (
    AdapterNotFound,
    AdapterRecord,
    Quota,
    RegistryUnavailable,
    TenantUsage,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
CHANNEL = "adapters"  # under the prefix: prefix-serve:adapters

# ARGV: prefix, tenant, name, record JSON (no version), now, max adapters, max bytes,
#       token (redis seconds at begin), window seconds, origin
_COMMIT = """
local p, tenant, name = ARGV[1], ARGV[2], ARGV[3]
local rec = cjson.decode(ARGV[4])
local t = redis.call('TIME')
if tonumber(t[1]) - tonumber(ARGV[8]) > tonumber(ARGV[9]) then return {'late'} end
local live, usage = p .. 'live:' .. tenant, p .. 'usage:' .. tenant
local prev = redis.call('HGET', live, name)
local count = tonumber(redis.call('HGET', usage, 'count') or '0')
local bytes = tonumber(redis.call('HGET', usage, 'bytes') or '0')
local hidden = tonumber(redis.call('HGET', usage, 'hidden') or '0')
local prev_rec = nil
if prev then
  prev_rec = cjson.decode(prev)
  bytes = bytes - prev_rec.size_bytes
  hidden = hidden + prev_rec.size_bytes
else
  count = count + 1
end
bytes = bytes + rec.size_bytes
if count > tonumber(ARGV[6]) or bytes + hidden > tonumber(ARGV[7]) then
  return {'quota', string.format('%d', count), string.format('%d', bytes + hidden)}
end
local version = redis.call('HINCRBY', p .. 'last:' .. tenant, name, 1)
rec.version = version
local enc = cjson.encode(rec)
redis.call('HSET', live, name, enc)
redis.call('HSET', p .. 'ver:' .. tenant .. ':' .. name, string.format('%d', version), enc)
if prev_rec then
  redis.call('ZADD', p .. 'hidden', ARGV[5],
    cjson.encode({tenant, name, prev_rec.version, prev_rec.size_bytes}))
end
redis.call('HINCRBY', p .. 'refs', rec.sha256, 1)
redis.call('HSET', usage, 'count', string.format('%d', count), 'bytes', string.format('%d', bytes),
  'hidden', string.format('%d', hidden))
local replaced = prev_rec and prev_rec.sha256 or ''
redis.call('PUBLISH', p .. 'adapters', cjson.encode({event = 'put', tenant = tenant, name = name,
  version = version, replaced = replaced, origin = ARGV[10]}))
return {'ok', enc, replaced}
"""

# ARGV: prefix, tenant, name, now, origin
_HIDE = """
local p, tenant, name = ARGV[1], ARGV[2], ARGV[3]
local live, usage = p .. 'live:' .. tenant, p .. 'usage:' .. tenant
local prev = redis.call('HGET', live, name)
if not prev then return false end
local rec = cjson.decode(prev)
redis.call('HDEL', live, name)
redis.call('ZADD', p .. 'hidden', ARGV[4],
  cjson.encode({tenant, name, rec.version, rec.size_bytes}))
redis.call('HINCRBY', usage, 'count', -1)
redis.call('HINCRBY', usage, 'bytes', string.format('%d', -rec.size_bytes))
redis.call('HINCRBY', usage, 'hidden', string.format('%d', rec.size_bytes))
redis.call('PUBLISH', p .. 'adapters', cjson.encode({event = 'delete', tenant = tenant,
  name = name, version = rec.version, replaced = rec.sha256, origin = ARGV[5]}))
return prev
"""

# ARGV: prefix, older than (unix seconds), batch size
_PURGE = """
local p = ARGV[1]
local members = redis.call(
  'ZRANGEBYSCORE', p .. 'hidden', '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(members) do
  local k = cjson.decode(m)
  local vkey = p .. 'ver:' .. k[1] .. ':' .. k[2]
  local field = string.format('%d', k[3])
  local enc = redis.call('HGET', vkey, field)
  if enc then
    local sha = cjson.decode(enc).sha256
    redis.call('HDEL', vkey, field)
    if redis.call('HINCRBY', p .. 'refs', sha, -1) <= 0 then
      redis.call('HDEL', p .. 'refs', sha)
    end
  end
  if k[4] then
    redis.call('HINCRBY', p .. 'usage:' .. k[1], 'hidden', string.format('%d', -k[4]))
  end
  redis.call('ZREM', p .. 'hidden', m)
end
return #members
"""


class RedisRegistry(Registry):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "prefix-serve:",
        timeout_s: float = 1.0,
        retry_interval_s: float = 1.0,
        commit_window_s: float = 30.0,
    ) -> None:
        """``commit_window_s``: a commit that reaches Redis later than this after ``begin``
        (e.g. delayed in a stopped server's socket buffer after the client gave up) is
        refused, so a blob the collector may already have judged orphaned is never named."""
        self.prefix = prefix
        self.channel = prefix + CHANNEL
        self.origin = secrets.token_hex(8)  # tells our own announcements from others'
        self._timeout_s = timeout_s
        self._retry_interval_s = retry_interval_s
        self._commit_window_s = commit_window_s
        self._down_until = 0.0
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # one attempt: the caller bounds its own latency
            driver_info=None,  # no CLIENT SETINFO round trip on connect
            decode_responses=True,
        )
        self._commit = self._client.register_script(_COMMIT)
        self._hide = self._client.register_script(_HIDE)
        self._purge = self._client.register_script(_PURGE)
        self._stop = threading.Event()
        self._watching = False
        self._thread: threading.Thread | None = None

    def begin(self) -> float:
        seconds, _micros = self._call(self._client.time)
        return float(seconds)

    def commit(
        self, new: NewVersion, quota: Quota, now: float, token: float
    ) -> tuple[AdapterRecord, str | None]:
        fields = asdict(new) | {"id": new_id(), "created": int(now)}
        args: list[str | int | float] = [
            self.prefix,
            new.tenant,
            new.name,
            json.dumps(fields),
            repr(now),
            quota.max_adapters,
            quota.max_total_bytes,
            int(token),
            self._commit_window_s,
            self.origin,
        ]
        reply = self._call(lambda: self._commit(args=args), retry=False)
        if reply[0] == "quota":
            check_quota(quota, new.tenant, int(reply[1]), int(reply[2]))
            raise AssertionError("the script and check_quota disagree")  # pragma: no cover
        if reply[0] == "late":
            raise RegistryUnavailable(
                f"the registry took longer than {self._commit_window_s} s to accept the upload"
            )
        return _record(reply[1]), reply[2] or None

    def get(self, tenant: str, name: str) -> AdapterRecord:
        enc = self._call(lambda: self._client.hget(self._key("live", tenant), name))
        if enc is None:
            raise AdapterNotFound(f"adapter {name!r} not found")
        return _record(enc)

    def list(self, tenant: str) -> list[AdapterRecord]:
        live = self._call(lambda: self._client.hgetall(self._key("live", tenant)))
        return [_record(live[name]) for name in sorted(live)]

    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:
        stored = self._call(lambda: self._client.hgetall(self._key("ver", f"{tenant}:{name}")))
        return sorted((_record(enc) for enc in stored.values()), key=lambda r: r.version)

    def hide(self, tenant: str, name: str, now: float) -> AdapterRecord:
        args = [self.prefix, tenant, name, repr(now), self.origin]
        enc = self._call(lambda: self._hide(args=args), retry=False)
        if enc is None:
            raise AdapterNotFound(f"adapter {name!r} not found")
        return _record(enc)

    def usage(self, tenant: str) -> tuple[int, int]:
        key = self._key("usage", tenant)
        got = self._call(lambda: self._client.hmget(key, "count", "bytes", "hidden"))
        return int(got[0] or 0), int(got[1] or 0) + int(got[2] or 0)

    def tenants(self) -> builtins.list[TenantUsage]:
        """A SCAN of the usage keys (admin listings only: O(keys in the database))."""
        start = len(self.prefix) + len("usage:")

        def read() -> list[tuple[str, list[str | None]]]:
            keys = list(self._client.scan_iter(match=_glob(self.prefix) + "usage:*", count=1000))
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, "count", "bytes", "hidden")
            return list(zip(keys, pipe.execute(), strict=True))

        found = []
        for key, (count, live, hidden) in self._call(read):
            adapters, stored = int(count or 0), int(live or 0) + int(hidden or 0)
            if adapters or stored:
                found.append(TenantUsage(key[start:], adapters, stored))
        return sorted(found, key=lambda u: u.tenant)

    def purge_hidden(self, older_than: float) -> int:
        total, batch = 0, 500
        while True:
            n: int = self._call(lambda: self._purge(args=[self.prefix, repr(older_than), batch]))
            total += n
            if n < batch:
                return total

    def referenced(self) -> set[str]:
        # decode_responses=True: the client's replies are str, not bytes.
        return set(self._call(lambda: cast(list[str], self._client.hkeys(self.prefix + "refs"))))

    def is_referenced(self, sha256: str) -> bool:
        return int(self._call(lambda: self._client.hget(self.prefix + "refs", sha256)) or 0) > 0

    def ping(self) -> bool:
        try:
            self._call(self._client.ping, retry=False, breaker=False)
        except RegistryUnavailable:
            return False
        # Redis answers: close the breaker, or /ready would say 200 while calls are still
        # refused for the rest of retry_interval_s.
        self._down_until = 0.0
        return True

    def watch(self, handler: EventHandler) -> None:
        assert self._thread is None, "watch() once per registry"
        self._thread = threading.Thread(
            target=self._listen, args=(handler,), name="registry-watch", daemon=True
        )
        self._thread.start()

    def watching(self) -> bool:
        return self._watching

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._client.close()

    # -- internals

    def _key(self, kind: str, rest: str) -> str:
        return f"{self.prefix}{kind}:{rest}"

    def _call(self, fn: Callable[[], T], *, retry: bool = True, breaker: bool = True) -> T:
        """Run one Redis call; RedisError -> RegistryUnavailable. ``retry``: once more at once
        on a connection error (a pooled connection that died with a restarted server); only
        for calls that are safe to repeat."""
        if breaker and time.monotonic() < self._down_until:
            raise RegistryUnavailable("adapter registry (Redis) unreachable; retry shortly")
        for attempt in (1, 2):
            try:
                return fn()
            except redis.ConnectionError as exc:  # refused, reset; not a timeout
                if retry and attempt == 1:
                    continue
                error: Exception = exc
            except (redis.TimeoutError, redis.ReadOnlyError, OSError) as exc:
                error = exc
            except redis.ResponseError as exc:
                if not str(exc).startswith(("MISCONF", "LOADING", "MASTERDOWN", "TRYAGAIN")):
                    raise
                error = exc
            break
        if breaker:
            self._down_until = time.monotonic() + self._retry_interval_s
        raise RegistryUnavailable(f"adapter registry (Redis) unavailable: {error}") from error

    def _listen(self, handler: EventHandler) -> None:
        """Background thread: (re)subscribe, then deliver others' announcements. A PING every
        half second finds a server that stopped answering (a stopped process keeps its socket
        open). Each (re)subscription sends "reset": announcements may have been missed."""
        while not self._stop.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]  # redis-py: unannotated
            try:
                pubsub.subscribe(self.channel)
                reply = pubsub.get_message(timeout=self._timeout_s)
                if not reply or reply["type"] != "subscribe":
                    raise redis.ConnectionError("no subscription confirmation")
                # Redis answers again: close the breaker before "reset" empties the callers'
                # caches, or a name held a moment ago would be refused until the breaker's
                # interval ran out (its cached record gone, its lookup not tried).
                self._down_until = 0.0
                _deliver(handler, Change("reset"))  # before watching(): no stale cache hit
                self._watching = True
                self._relay(pubsub, handler)
            except (redis.RedisError, OSError) as exc:
                if self._watching:
                    log.warning("adapter registry announcements lost (%s); reconnecting", exc)
            finally:
                self._watching = False
                pubsub.close()
            self._stop.wait(0.2)

    def _relay(self, pubsub: redis.client.PubSub, handler: EventHandler) -> None:
        ping_every = 0.5
        last_heard = time.monotonic()
        pinged_at: float | None = None
        while not self._stop.is_set():
            msg = pubsub.get_message(timeout=0.1)
            now = time.monotonic()
            if msg is not None:
                last_heard, pinged_at = now, None
                if msg["type"] == "message":
                    self._dispatch(msg["data"], handler)
            if pinged_at is None and now - last_heard > ping_every:
                pubsub.ping()
                pinged_at = now
            elif pinged_at is not None and now - pinged_at > self._timeout_s:
                raise redis.TimeoutError("no answer to PING on the announcement channel")

    def _dispatch(self, data: str, handler: EventHandler) -> None:
        try:
            event = json.loads(data)
            replaced = event["replaced"] or None
            change = Change(event["event"], event["tenant"], event["name"], replaced)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed announcement %.200r", data)
            return
        if event.get("origin") != self.origin and change.event in ("put", "delete"):
            _deliver(handler, change)


def _deliver(handler: EventHandler, change: Change) -> None:
    try:
        handler(change)
    except Exception:  # a subscriber's bug must not stop announcements for the others
        log.exception("adapter change handler failed")


def _record(enc: str | bytes) -> AdapterRecord:
    return AdapterRecord(**json.loads(enc))


def _glob(text: str) -> str:
    """``text`` matched literally in a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
