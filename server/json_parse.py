"""JSON request bodies: parsed with bounded nesting and size of structure, and checked to be
valid Unicode text. Pure functions of the bytes (no server imports: the parser process of
``server.json_worker`` runs them without loading the rest of the server).

Python's ``json`` accepts things the rest of the server cannot take: nesting deep enough to
exhaust the interpreter's recursion limit (``RecursionError``, at a depth that depends on the
caller's stack); ``"\\ud800"``-style escapes (or raw UTF-8 surrogate bytes, which ``json``
decodes with ``surrogatepass``) that become lone UTF-16 surrogates, which no tokenizer,
database or UTF-8 encoder accepts; and millions of tiny values, whose Python objects take
seconds to build, copy and validate. All are the client's mistake and answer 400. A fixed
``MAX_DEPTH`` makes the first deterministic; ``MAX_VALUES`` and ``MAX_CONTAINERS`` bound the
last far above what any request the server can serve holds (64 prompts of 8,192 token ids
are half a million values in 65 arrays).

The checks are scans in C over the text (``str.count``, ``re``, ``str.replace``/``split``,
numpy), never a Python step per value, except the count of values, which walks the parsed
body only when the number of commas and brackets says it might be over (and stops at the
limit).
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable
from itertools import islice
from typing import Any

import numpy as np

MAX_DEPTH = 64  # arrays and objects open at once; far beyond any OpenAI-shaped body
MAX_VALUES = 1 << 20  # JSON values (scalars, arrays, objects) of one body
MAX_CONTAINERS = 1 << 14  # arrays and objects of one body
MAX_MEMBERS = 64  # top-level fields searched for the one at fault (OpenAI bodies have ~30)
_TOO_DEEP = f"the request body nests arrays or objects deeper than {MAX_DEPTH} levels"
_NOT_BRACKETS = bytes(sorted(set(range(128)) - set(b"[]{}")))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a pair too: the exact check tells


class BodyError(ValueError):
    """The body is refused (400): ``code`` is OpenAI's error code, ``param`` the top-level
    field at fault when one is known."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def value_bound(text: str) -> int:
    """At least the number of JSON values in ``text``: every value but the whole body's follows
    a comma or an opening bracket (commas and brackets inside strings only raise the bound)."""
    return text.count(",") + text.count("[") + text.count("{") + 1


def decode(raw: bytes) -> str:
    """What ``json.loads(bytes)`` does first: the text, in the encoding JSON allows."""
    try:
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError:
        raise BodyError("the request body is not valid JSON", "invalid_json") from None


def parse(raw: bytes) -> Any:
    """The parsed body, or ``BodyError``: invalid JSON, nested deeper than ``MAX_DEPTH``,
    holding more than ``MAX_VALUES`` values or ``MAX_CONTAINERS`` arrays and objects, or a
    string (key or value) holding a lone surrogate. Empty bytes parse to None."""
    if not raw:
        return None
    text = decode(raw)
    collecting = gc.isenabled()
    gc.disable()  # a body of a million small lists would trigger hundreds of collections
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep(None) from None
    except ValueError:  # JSONDecodeError
        raise BodyError("the request body is not valid JSON", "invalid_json") from None
    finally:
        if collecting:
            gc.enable()
    openers = text.count("[") + text.count("{")
    # Fewer openers than the limit cannot nest past it (the common case: nothing to measure).
    if openers > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise _too_deep(_first_member(data, _nests_past_the_limit))
    if openers > MAX_CONTAINERS or value_bound(text) > MAX_VALUES:
        _check_size(data)
    if _maybe_surrogate(text) and not _is_text(data):
        param = _first_member(data, lambda v: not _is_text(v))
        raise BodyError(
            f"{param or 'the body'}: holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
            "or its raw bytes), which is not valid Unicode text",
            "invalid_request",
            param,
        )
    return data


def _too_deep(param: str | None) -> BodyError:
    return BodyError(_TOO_DEEP, "invalid_json", param)


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


def _check_size(data: Any) -> None:
    """``BodyError`` when ``data`` holds more than ``MAX_VALUES`` values or ``MAX_CONTAINERS``
    arrays and objects, naming the top-level field in which the count passed the limit. The
    walk stops there: at most ``MAX_VALUES`` steps, whatever the body holds."""
    values, containers = 1, 0
    if isinstance(data, dict):
        values, containers = 1 + len(data), 1
        members: Any = data.items()
    else:
        members = [(None, data)]
    for name, member in members:
        stack = [member]
        while stack:
            value = stack.pop()
            if not isinstance(value, (dict, list)):
                continue
            items = value.values() if isinstance(value, dict) else value
            containers += 1
            values += len(items)
            if values > MAX_VALUES or containers > MAX_CONTAINERS:
                raise BodyError(
                    f"{name + ': ' if name is not None else ''}the request body holds more "
                    f"than {MAX_VALUES} JSON values or {MAX_CONTAINERS} arrays and objects, "
                    "far more than any request this server can serve",
                    "invalid_request",
                    name,
                )
            stack.extend(v for v in items if isinstance(v, (dict, list)))


def _maybe_surrogate(text: str) -> bool:
    """Whether ``text`` might hold a lone surrogate: a ``\\uD800``-``\\uDFFF`` escape (a pair
    too: the exact check tells them apart), or a surrogate decoded from raw bytes (only
    non-ASCII text can hold one, and encoding it as UTF-8 fails exactly then)."""
    if _SURROGATE_ESCAPE.search(text):
        return True
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
