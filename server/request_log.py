"""One JSON line per request, and the request id it is filed under.

The API builds a ``RequestLog`` when it answers (or a stream ends) and writes it with
``log_request``: ids, counts and timings only. Never a prompt, a completion, or a key: the log
is for operators, and tenants' data stays out of it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_LOGGER = "prefix_serve.requests"
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def request_id_from(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]],
) -> str:
    """The client's ``X-Request-ID`` when it is safe to echo and log (1 to 128 characters of
    ``[A-Za-z0-9._-]``), else a new id. Header names match case-insensitively; ``headers`` may
    be Starlette's ``Headers``, a dict, or (name, value) pairs, as str or as the raw bytes of
    an ASGI scope's ``headers``."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        # Raw ASGI headers: name and value both bytes.
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if name.lower() == REQUEST_ID_HEADER.lower():
            if _SAFE_ID.fullmatch(value):
                return value
            break
    return new_request_id()


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class RequestLog:
    """What one log line says about a request. Times in seconds (None when not reached, e.g.
    no first token); ``status`` is the HTTP status (499: the client left before an answer);
    ``error_type`` the OpenAI error type of the error answered (a 4xx or 5xx, or the error
    event that ended a 200 stream); ``route`` the template of the route the request was sent
    to, answered there or before routing (a body over its limit), ``unmatched`` for none;
    token counts and ``finish_reason`` cover every engine request of the HTTP request, those
    aborted included (``abort``, with the tokens they had); ``adapter_ids`` are the
    server-made ids of the adapters used, in order (names are the tenant's words, ids are
    ours)."""

    request_id: str
    tenant: str
    method: str
    route: str  # the route template, e.g. /v1/adapters/{name}
    status: int
    adapter_ids: tuple[str, ...] = ()
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    finish_reason: str | None = None
    error_type: str | None = None
    stream: bool = False
    queue_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None


def format_request_log(record: RequestLog, *, now: float | None = None) -> str:
    """One line of JSON: ``{"ts": ISO-8601 UTC, "event": "request", ...fields}``. Timings are
    rounded to microseconds. ``json.dumps`` escapes control characters, so a value can never
    break the line."""
    ts = time.time() if now is None else now
    fields = asdict(record)
    fields["adapter_ids"] = list(record.adapter_ids)
    for key in ("queue_s", "ttft_s", "e2e_s"):
        if fields[key] is not None:
            fields[key] = round(fields[key], 6)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
    return json.dumps({"ts": stamp, "event": "request", **fields}, separators=(",", ":"))


def log_request(record: RequestLog, logger: logging.Logger | None = None) -> None:
    """Write the record's line at INFO (WARNING for a 5xx) to ``prefix_serve.requests``."""
    logger = logger or logging.getLogger(REQUEST_LOGGER)
    level = logging.WARNING if record.status >= 500 else logging.INFO
    if logger.isEnabledFor(level):
        logger.log(level, format_request_log(record))
