"""JSON request bodies: parsed with bounded nesting and checked to be valid Unicode text.

Python's ``json`` accepts two things the rest of the server cannot take: nesting deep enough
to exhaust the interpreter's recursion limit (``RecursionError``, at a depth that depends on
the caller's stack), and ``"\\ud800"``-style escapes (or raw UTF-8 surrogate bytes, which
``json`` decodes with ``surrogatepass``) that become lone UTF-16 surrogates, which no
tokenizer, database or UTF-8 encoder accepts. Both are the client's mistake and answer 400.
A fixed ``MAX_DEPTH`` makes the first one deterministic.

This runs on the event loop once per request, so its cost must stay well below the parse's
own for any body up to ``--max-request-bytes`` (8 MiB: four million integers): the checks are
scans in C over the text (``str.count``, ``re``, ``str.replace``/``split``, numpy), never a
Python step per value; the exact checks run only when a cheap scan says they might fail.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable
from itertools import islice
from typing import Any

import numpy as np

from server.api.errors import APIError

MAX_DEPTH = 64  # arrays and objects open at once; far beyond any OpenAI-shaped body
MAX_MEMBERS = 64  # top-level fields searched for the one at fault (OpenAI bodies have ~30)
_TOO_DEEP = f"the request body nests arrays or objects deeper than {MAX_DEPTH} levels"
_NOT_BRACKETS = bytes(sorted(set(range(128)) - set(b"[]{}")))
# A surrogate escape (a pair too: the exact check tells them apart) or a decoded surrogate.
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def load_json(raw: bytes) -> Any:
    """The parsed body, or ``APIError(400)``: invalid JSON, nested deeper than ``MAX_DEPTH``,
    or a string (key or value) holding a lone surrogate. Empty bytes parse to None."""
    if not raw:
        return None
    try:
        # What ``json.loads(bytes)`` does, kept as text for the scans below.
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    collecting = gc.isenabled()
    gc.disable()  # a body of a million small lists would trigger hundreds of collections
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep(None) from None
    except ValueError:  # JSONDecodeError
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    finally:
        if collecting:
            gc.enable()
    # Fewer openers than the limit cannot nest past it (the common case: nothing to measure).
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise _too_deep(_first_member(data, _nests_past_the_limit))
    if _MAYBE_SURROGATE.search(text) and not _is_text(data):
        param = _first_member(data, lambda v: not _is_text(v))
        raise APIError(
            400,
            f"{param or 'the body'}: holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
            "or its raw bytes), which is not valid Unicode text",
            code="invalid_request",
            param=param,
        )
    return data


def _too_deep(param: str | None) -> APIError:
    return APIError(400, _TOO_DEEP, code="invalid_json", param=param)


def _depth(text: str) -> int:
    """How deep the arrays and objects of valid JSON ``text`` nest (0 for a scalar). In C: the
    escapes that could hide a quote go first (``\\\\`` pairs, then ``\\"``), so every quote
    left delimits a string; outside strings only the brackets are kept, and numpy takes the
    maximum of their running count."""
    plain = text.replace("\\\\", "").replace('\\"', "")
    brackets = "".join(plain.split('"')[::2]).encode("ascii").translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.zeros(256, dtype=np.int8)
    steps[list(b"[{")], steps[list(b"]}")] = 1, -1
    return int(np.cumsum(steps[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int32).max())


def _nests_past_the_limit(member: Any) -> bool:
    """Whether a member of the top-level object (one level down) nests past ``MAX_DEPTH``."""
    try:
        return _depth(json.dumps(member)) >= MAX_DEPTH
    except RecursionError:
        return True


def _is_text(data: Any) -> bool:
    """Whether every string in ``data`` (keys included) is valid Unicode: serialising it as
    UTF-8 fails exactly on a lone surrogate. One C pass."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_member(data: Any, bad: Callable[[Any], bool]) -> str | None:
    """The first top-level field, among the first ``MAX_MEMBERS``, whose value is ``bad``;
    None when the body is not an object, or the fault is in a key or further on."""
    if not isinstance(data, dict):
        return None
    return next((k for k, v in islice(data.items(), MAX_MEMBERS) if bad(v)), None)
