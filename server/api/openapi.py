"""The OpenAPI document served at ``GET /openapi.json`` (no auth, like ``/health``).

FastAPI derives the paths and path parameters from the routes. The routes cannot say the rest
themselves, so it is added here: the request bodies (each route reads its own, after checking
the key; the upload route takes two kinds), bearer security, every status each route answers
with (errors in OpenAI's shape; FastAPI's 422 is dropped, as validation errors answer 400),
``Retry-After`` on 429 and 503, ``X-Request-ID`` on every answer, and the event stream of
``stream: true``.

Every route of the app must be listed in ``ROUTES``: one added without its answers described
fails at app creation. tests/reliability/test_schema.py checks the server against this
document (schemathesis: no 5xx, every status, media type, body and header as declared).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.api import admin, schemas

REF = "#/components/schemas/{model}"
BEARER = "bearer"

ERRORS = {
    400: "Invalid request: a bad field, a prompt longer than the context, a bad adapter.",
    401: "Missing or unknown API key.",
    403: "The API key is not an admin key.",
    404: "Unknown model or adapter (another tenant's adapter included).",
    409: "Conflicting write.",
    413: "Request body, upload or adapter too large, or over the tenant's quota.",
    415: "Unsupported content type or archive type.",
    429: "Overloaded: the request queue, or the upload memory budget, is full; retry after "
    "Retry-After seconds.",
    503: "Not ready, draining, timed out, or the registry is unavailable; retry later.",
    507: "Adapter storage is full.",
}
RETRYABLE = frozenset({429, 503})


def _ref(model: type) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _event_stream(chunk: type) -> dict[str, Any]:
    """Each event's ``data`` is one JSON chunk, an error object (a failure after the headers
    were sent), or the final ``[DONE]``."""
    payload = {"anyOf": [_ref(chunk), _ref(schemas.ErrorResponse)]}
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]
    }
    event = {"type": "object", "properties": {"data": data}, "required": ["data"]}
    return {"text/event-stream": {"schema": event}}


HEADERS = {
    "X-Request-ID": {
        "description": "The client's X-Request-ID when safe to echo, else a new id.",
        "required": True,
        "schema": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,128}$"},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
}


def _headers(retry_after: bool) -> dict[str, Any]:
    names = ["X-Request-ID", "Retry-After"] if retry_after else ["X-Request-ID"]
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


class Answer(NamedTuple):
    description: str
    content: dict[str, Any]
    retry_after: bool = False


@dataclass(frozen=True)
class Route:
    """What one operation answers: ``answers`` by status (successes, and the ops routes' 503s,
    which are not error-shaped); ``errors`` are the statuses answered in OpenAI's error shape."""

    answers: dict[int, Answer]
    errors: tuple[int, ...] = ()
    auth: bool = True
    body: dict[str, Any] | None = None  # the routes read their bodies themselves


_FILE = {"type": "string", "format": "binary"}
_NAME = {"type": "string", "pattern": schemas.NAME_PATTERN}
UPLOAD_BODY = {
    "required": True,
    "description": "PEFT files (config + weights), an archive of a PEFT output directory "
    "(.zip or .tar.gz), or a named text prefix.",
    "content": {
        "multipart/form-data": {
            "schema": {
                "oneOf": [
                    {
                        "type": "object",
                        "title": "PeftFiles",
                        "properties": {"name": _NAME, "config": _FILE, "weights": _FILE},
                        "required": ["name", "config", "weights"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "title": "PeftArchive",
                        "properties": {"name": _NAME, "archive": _FILE},
                        "required": ["name", "archive"],
                        "additionalProperties": False,
                    },
                ]
            },
            # No "encoding": the parts' own content types are not read (the archive's type
            # is found from its bytes).
        },
        "application/json": {"schema": _ref(schemas.TextAdapterBody)},
    },
}

_GENERATION_ERRORS = (400, 401, 404, 413, 429, 503)


def _json_body(model: type) -> dict[str, Any]:
    return {"required": True, "content": _json(model)}


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/health"): Route(
        {
            200: Answer("The engine loop is alive.", _json(schemas.Health)),
            503: Answer("The engine loop has stopped.", _json(schemas.Health)),
        },
        auth=False,
    ),
    ("GET", "/ready"): Route(
        {
            200: Answer("The model is loaded and the registry answers.", _json(schemas.Ready)),
            503: Answer("Not ready; the reason says why.", _json(schemas.NotReady), True),
        },
        auth=False,
    ),
    ("GET", "/metrics"): Route(
        {200: Answer("Prometheus text format.", {"text/plain": {"schema": {"type": "string"}}})},
        auth=False,
    ),
    ("GET", "/v1/models"): Route(
        {200: Answer("The base model and the caller's adapters.", _json(schemas.ModelList))},
        (401, 503),
    ),
    ("GET", "/v1/models/{model_id}"): Route(
        {200: Answer("The base model, or one of the caller's adapters.", _json(schemas.Model))},
        (401, 404, 503),
    ),
    ("POST", "/v1/completions"): Route(
        {
            200: Answer(
                "A completion, or with stream: true its server-sent events.",
                {**_json(schemas.Completion), **_event_stream(schemas.CompletionChunk)},
            )
        },
        _GENERATION_ERRORS,
        body=_json_body(schemas.CompletionRequest),
    ),
    ("POST", "/v1/chat/completions"): Route(
        {
            200: Answer(
                "A chat completion, or with stream: true its server-sent events.",
                {**_json(schemas.ChatCompletion), **_event_stream(schemas.ChatCompletionChunk)},
            )
        },
        _GENERATION_ERRORS,
        body=_json_body(schemas.ChatCompletionRequest),
    ),
    ("POST", "/v1/adapters"): Route(
        {201: Answer("The new adapter version.", _json(schemas.Adapter))},
        (400, 401, 409, 413, 415, 429, 503, 507),
        body=UPLOAD_BODY,
    ),
    ("GET", "/v1/adapters"): Route(
        {200: Answer("The caller's adapters.", _json(schemas.AdapterList))}, (401, 503)
    ),
    ("GET", "/v1/adapters/{name}"): Route(
        {200: Answer("The live version of the adapter.", _json(schemas.Adapter))},
        (401, 404, 503),
    ),
    ("GET", "/v1/adapters/{name}/versions"): Route(
        {200: Answer("The adapter's kept versions, oldest first.", _json(schemas.AdapterList))},
        (401, 404, 503),
    ),
    ("DELETE", "/v1/adapters/{name}"): Route(
        {200: Answer("Every version of the adapter was hidden.", _json(schemas.AdapterDeleted))},
        (401, 404, 409, 503),
    ),
    # Admin keys only. 400: a malformed tenant; 404 on the listing: a tenant with a "/" (the
    # path no longer matches the route).
    ("GET", "/v1/admin/tenants"): Route(
        {200: Answer("Every tenant's usage and quota.", _json(admin.TenantList))},
        (401, 403, 503),
    ),
    ("GET", "/v1/admin/tenants/{tenant}/adapters"): Route(
        {200: Answer("The tenant's live adapters.", _json(schemas.AdapterList))},
        (400, 401, 403, 404, 503),
    ),
    ("DELETE", "/v1/admin/tenants/{tenant}/adapters/{adapter}"): Route(
        {200: Answer("Every version of the adapter was hidden.", _json(schemas.AdapterDeleted))},
        (400, 401, 403, 404, 503),
    ),
}


def build_openapi(app: FastAPI, auth: bool) -> dict[str, Any]:
    """The document for ``app``; ``auth`` is False in open mode (no keys: no security, no 401).

    Raises ``LookupError`` for a route missing from ``ROUTES`` (or listed and gone)."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description="prefix-serve: an OpenAI-compatible server of prefix adapters.",
        routes=app.routes,
    )
    components = doc.setdefault("components", {})
    found = components.setdefault("schemas", {})
    found.pop("HTTPValidationError", None)
    found.pop("ValidationError", None)
    found.update(copy.deepcopy(_model_schemas()))
    components["headers"] = copy.deepcopy(HEADERS)
    if auth:
        components["securitySchemes"] = {
            BEARER: {"type": "http", "scheme": "bearer", "description": "An API key."}
        }
    seen = set()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            key = (method.upper(), path)
            if key not in ROUTES:
                raise LookupError(f"{method.upper()} {path} is not described in openapi.ROUTES")
            seen.add(key)
            _describe(operation, ROUTES[key], auth)
    missing = set(ROUTES) - seen
    if missing:
        raise LookupError(f"openapi.ROUTES lists routes the app lacks: {sorted(missing)}")
    return doc


@functools.cache
def _model_schemas() -> dict[str, Any]:
    """Pydantic's own schemas of the bodies (FastAPI's pass through its OpenAPI model, which
    turns integer bounds into floats: 2**64 - 1 would read 2**64). Made once: ~40 ms."""
    models: list[type[BaseModel]] = [
        *schemas.REQUEST_MODELS,
        *schemas.RESPONSE_MODELS,
        *admin.RESPONSE_MODELS,
    ]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    model_defs: dict[str, Any] = defs["$defs"]
    return model_defs


def _describe(operation: dict[str, Any], route: Route, auth: bool) -> None:
    if route.body is not None:
        operation["requestBody"] = copy.deepcopy(route.body)
    secured = route.auth and auth
    operation["security"] = [{BEARER: []}] if secured else []
    responses: dict[str, Any] = {}
    for status, answer in route.answers.items():
        responses[str(status)] = {
            "description": answer.description,
            "headers": _headers(answer.retry_after),
            "content": answer.content,
        }
    for status in route.errors:
        if status == 401 and not secured:
            continue
        responses[str(status)] = {
            "description": ERRORS[status],
            "headers": _headers(status in RETRYABLE),
            "content": _json(schemas.ErrorResponse),
        }
    operation["responses"] = dict(sorted(responses.items()))
