"""The outermost ASGI middleware: request id, metrics, and the last line of error handling."""

from __future__ import annotations

import functools
import itertools
import logging
import re
import secrets
import time
from typing import Any

from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bilten import errors, logs, metrics, ratelimit
from bilten.errors import ApiError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
UNMATCHED = "<unmatched>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# Request ids need to be unique, not secret: a random per-process prefix and a counter are
# unique across instances and cost far less than a uuid4 (a system call) per request.
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count()


def _incoming_request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if _VALID_REQUEST_ID.match(value):
                return bytes(value).decode()
            break
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def route_template(scope: Scope) -> str:
    """The matched route's path template: metrics labels never carry raw paths."""
    route = scope.get("route")
    return route.path if isinstance(route, Route) else UNMATCHED


@functools.cache
def _series(method: str, route: str, status: int) -> tuple[Any, Any]:
    # labels() takes a lock and builds a key per call; the label sets are few, so keep them.
    return (
        metrics.HTTP_LATENCY.labels(method, route),
        metrics.HTTP_REQUESTS.labels(method, route, str(status)),
    )


class ApiBudget:
    """The general per-IP request budget of the API, shared by all instances (``bilten.budget``:
    counted locally, reconciled with Redis every few milliseconds).

    Operations endpoints are exempt (load balancers and scrapers poll them), and so are the web
    app's page and static files (served from memory; the API calls the page makes count).
    """

    EXEMPT = ("/health", "/metrics", "/openapi.json", "/docs", "/assets/")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] != "/"
            and not scope["path"].startswith(self.EXEMPT)
        ):
            client = scope.get("client")
            budget = scope["state"]["bilten"].budget
            outcome = await budget.hit(client[0] if client else "-")
            if not outcome.allowed:
                await errors.response(ratelimit.limited(outcome))(scope, receive, send)
                return
        await self.app(scope, receive, send)


# On every response. A page that needs more (the API docs) sends its own policy.
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_STRICT_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


class RequestContext:
    """Request ids, metrics, security headers, and the last line of error handling. ``hsts``:
    the site is served over https (``BILTEN_PUBLIC_URL``), so browsers are told to keep to it."""

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app = app
        self.headers = [*_SECURITY_HEADERS, *([_HSTS] if hsts else [])]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = _incoming_request_id(scope)
        token = logs.request_id.set(rid)
        try:
            if scope["type"] == "http":
                await self._http(scope, receive, send, rid)
            else:
                await self.app(scope, receive, send)
        finally:
            logs.request_id.reset(token)

    async def _http(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        status = 500
        started = False
        header = (REQUEST_ID_HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [*message.get("headers", ()), header, *self.headers]
                if not any(name.lower() == _STRICT_CSP[0] for name, _ in headers):
                    headers.append(_STRICT_CSP)
                message["headers"] = headers
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        begun = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except errors.UNAVAILABLE as exc:
            # PostgreSQL or Redis out of reach, or no connection free in time: the client may
            # retry; this is overload or an outage, not a bug.
            log.warning("%s %s: %s: %s", scope["method"], scope["path"], type(exc).__name__, exc)
            if not started:
                response = errors.response(
                    ApiError(
                        "unavailable",
                        "A service Bilten depends on is unavailable or busy; try again shortly.",
                        {"request_id": rid},
                        headers={"Retry-After": "2"},
                    )
                )
                await response(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send_with_id(
                    {
                        "type": "http.response.body",
                        "body": errors.body(
                            "internal_error",
                            "Internal server error.",
                            {"request_id": rid},
                        ),
                    }
                )
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            latency, count = _series(method, route_template(scope), status)
            latency.observe(time.perf_counter() - begun)
            count.inc()
