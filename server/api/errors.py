"""The one place where exceptions become HTTP answers, always in OpenAI's error shape::

    {"error": {"message": "...", "type": "...", "param": "..." | null, "code": "..." | null}}

Statuses follow docs/api.md: 400 invalid request, 401 auth, 404 unknown model/adapter, 409 conflict,
413 too large, 415 unsupported file type, 429 overloaded and 503 unavailable (both with
``Retry-After``), and 507 when adapter storage is full (no ``Retry-After``: space must be freed
first). Anything else that escapes a handler is a bug and answers 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store.types import StoreError
from adapters_store.validate import AdapterError, AdapterTooLargeError
from server.api.archive import UnsupportedArchive
from server.engine.request import InvalidRequest
from server.engine_client import EngineFailure, EngineUnavailable, Overloaded, RequestFailed

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "overloaded_error",
    500: "internal_error",
    503: "service_unavailable_error",
    507: "insufficient_storage_error",
}


class APIError(Exception):
    """An HTTP error raised by the API layer itself."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def not_found(what: str, name: str, param: str) -> APIError:
    return APIError(
        404, f"The {what} {name!r} does not exist", code=f"{what}_not_found", param=param
    )


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the HTTP answer the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnsupportedArchive):
        return APIError(415, exc.message, code="unsupported_media_type", param=exc.param)
    if isinstance(exc, AdapterTooLargeError):
        return APIError(413, exc.message, code="adapter_too_large", param=exc.param)
    if isinstance(exc, AdapterError):
        return APIError(400, exc.message, code="invalid_adapter", param=exc.param)
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), code="invalid_request", param=exc.param)
    if isinstance(exc, StoreError):
        return _store_error(exc)
    if isinstance(exc, Overloaded):
        return APIError(429, str(exc), code=exc.code, retry_after=exc.retry_after)
    if isinstance(exc, RequestFailed):
        # The request's own inputs drove it out of range (400), or a failure isolated to it.
        status = 500 if exc.error.kind == "engine" else 400
        return APIError(status, str(exc), code=f"{exc.error.kind}_error")
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc), code="engine_unavailable", retry_after=exc.retry_after)
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code=_http_code(exc.status_code))
    if isinstance(exc, EngineFailure):
        return APIError(500, str(exc), code="engine_failure")
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


def _store_error(exc: StoreError) -> APIError:
    message = str(exc) or type(exc).__name__
    code = _snake(type(exc).__name__)
    if exc.status == 404:
        return APIError(404, message, code="adapter_not_found", param="name")
    if exc.status in (400, 409, 413, 415):
        return APIError(exc.status, message, code=code)
    if exc.status == 507:  # blob storage full: an operator must free space
        return APIError(507, message, code=code)
    if exc.status > 500:
        # Registry unreachable, blob storage read-only: retryable.
        return APIError(503, message, code=code, retry_after=getattr(exc, "retry_after", 5) or 5)
    log.error("store error", exc_info=exc)
    return APIError(500, message, code=code)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body", code="invalid_request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return APIError(400, message, code="invalid_request", param=param)


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        status, "http_error"
    )


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        request.app.state.ctx.metrics.count_error(err.body()["error"]["type"])
        return err.response()

    for cls in (
        APIError,
        RequestValidationError,
        StarletteHTTPException,
        AdapterError,
        InvalidRequest,
        StoreError,
        Overloaded,
        EngineUnavailable,
        RequestFailed,  # answered here, not by the 500 fallback (which drops the headers)
        EngineFailure,
        Exception,
    ):
        app.add_exception_handler(cls, handle)
