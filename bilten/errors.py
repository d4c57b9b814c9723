"""The one error shape of the API and its table of stable codes.

Every error response is ``{"error": {"code", "message", "details"}}``; the status comes from
:data:`CODES`. Handlers raise :class:`ApiError`; Starlette's own HTTP errors (404, 405, ...) are
mapped onto the same shape.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
from redis.exceptions import ClusterError as RedisClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import TryAgainError as RedisTryAgainError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

CODES: dict[str, int] = {
    "validation_error": 422,
    "bad_request": 400,
    "invalid_token": 400,
    "unauthorized": 401,
    "invalid_credentials": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "email_taken": 409,
    "seat_unavailable": 409,
    "sold_out": 409,
    "already_checked_in": 409,
    "hold_expired": 410,
    "payment_declined": 402,
    "idempotency_mismatch": 422,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "internal_error": 500,
    "internal": 500,  # a booking request that could not be processed; it failed alone
    "unavailable": 503,
}

# A dependency out of reach, or a moment's contention, never the request itself: a request
# answers 503 with Retry-After, and queued work waits and runs again instead of failing.
UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterError,  # a cluster failing over: CLUSTERDOWN, its retries used up
    RedisTryAgainError,  # a cluster moving slots
    RedisReadOnlyError,  # a primary turned replica, until the client finds the new one
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shutting down, starting up
    asyncpg.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.TransactionRollbackError,  # deadlock, serialization failure
    asyncpg.LockNotAvailableError,  # lock_timeout
    ConnectionError,
    TimeoutError,
)

# Starlette raises HTTPException with a bare status; these are the codes we answer with.
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}

_MESSAGES = {
    "not_found": "No such resource.",
    "method_not_allowed": "Method not allowed on this resource.",
    "internal_error": "Internal server error.",
}


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail


_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An error the client caused or should know about; becomes the error response."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        details: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.status = CODES[code]
        self.message = message or _MESSAGES.get(code, code.replace("_", " ").capitalize() + ".")
        self.details = details
        self.headers = headers
        super().__init__(f"{code}: {self.message}")


def body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return _encoder.encode(
        ErrorBody(error=ErrorDetail(code=code, message=message, details=details or {}))
    )


def response(error: ApiError) -> Response:
    return Response(
        body(error.code, error.message, error.details),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "bad_request")
    message = _MESSAGES.get(code) or (exc.detail if isinstance(exc.detail, str) else code)
    error = ApiError(code, message, headers=dict(exc.headers) if exc.headers else None)
    if CODES[code] != exc.status_code:  # a status we have no code for keeps its own status
        error.status = exc.status_code
    return response(error)


HANDLERS = {ApiError: _api_error, HTTPException: _http_exception}
