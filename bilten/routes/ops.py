"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document and its viewer."""

from __future__ import annotations

import asyncio
import datetime
import hmac
import ipaddress
from collections.abc import Awaitable
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten import __version__, docs_ui, metrics, openapi
from bilten.docs_ui.examples import request_examples
from bilten.errors import ApiError
from bilten.state import state
from bilten.wire import JSONResponse

Check = Literal["ok", "unavailable"]


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok"]


class Ready(msgspec.Struct, kw_only=True):
    status: Literal["ok"]
    postgres: Check
    redis: Check


_OK = Health(status="ok")
_DOCS_PAGE_HEADERS = {"Content-Security-Policy": docs_ui.CSP, "Cache-Control": "no-cache"}
_FOREVER = "public, max-age=31536000, immutable"


@openapi.endpoint(summary="Liveness: the process answers.", tag="operations", response=Health)
async def health(request: Request) -> Response:
    return JSONResponse(_OK)


async def _check(probe: Awaitable[object], timeout: float) -> Check:
    try:
        await asyncio.wait_for(probe, timeout)
    except Exception:
        return "unavailable"
    return "ok"


@openapi.endpoint(
    summary="Readiness: PostgreSQL and Redis answer within a short timeout.",
    tag="operations",
    response=Ready,
    errors=("unavailable",),
)
async def ready(request: Request) -> Response:
    app = state(request)
    timeout = app.settings.ready_timeout
    pg, rd = await asyncio.gather(
        _check(app.db.fetchval("SELECT 1"), timeout), _check(app.redis.ping(), timeout)
    )
    if pg != "ok" or rd != "ok":
        raise ApiError(
            "unavailable",
            "A dependency does not answer.",
            {"postgres": pg, "redis": rd},
            headers={"Retry-After": "5"},
        )
    return JSONResponse(Ready(status="ok", postgres=pg, redis=rd))


@openapi.endpoint(
    summary="Prometheus metrics in the text exposition format.",
    tag="operations",
    content_type="text/plain",
    errors=("forbidden",),
    description="Only from BILTEN_METRICS_ALLOW (default: this host) or with "
    "Authorization: Bearer BILTEN_METRICS_TOKEN.",
)
async def prometheus(request: Request) -> Response:
    settings = state(request).settings
    if not allowed_operator(request, settings.metrics_allow, settings.metrics_token):
        raise ApiError("forbidden", "Metrics are for the configured addresses or bearer token.")
    return Response(metrics.generate_latest(), media_type=metrics.CONTENT_TYPE)


def allowed_operator(request: Request, networks: tuple[str, ...], token: str) -> bool:
    """From one of ``networks``, or carrying ``Authorization: Bearer <token>`` (when set)."""
    if token:
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n) for n in networks)


@openapi.endpoint(summary="This OpenAPI 3.1 document.", tag="operations")
async def openapi_json(request: Request) -> Response:
    cached = getattr(request.app.state, "openapi", None)
    if cached is None:
        spec = openapi.document(
            request.app.routes,
            title="Bilten",
            version=__version__,
            examples=request_examples(datetime.date.today()),
        )
        cached = request.app.state.openapi = JSONResponse(spec).body
    return Response(cached, media_type="application/json")


@openapi.endpoint(
    summary="Swagger UI over the OpenAPI document, with try-it-out (no outside resources).",
    tag="operations",
    content_type="text/html",
    description="Registering or signing in there authorizes every later call it makes.",
)
async def docs(request: Request) -> Response:
    return Response(docs_ui.PAGE, media_type="text/html; charset=utf-8", headers=_DOCS_PAGE_HEADERS)


async def docs_asset(request: Request) -> Response:
    """A file of the docs page; kept for a year when its URL names this release's files."""
    found = docs_ui.FILES.get(request.path_params["path"])
    if found is None:
        raise ApiError("not_found", "No such file.")
    body, media_type = found
    current = request.path_params["digest"] == docs_ui.DIGEST
    return Response(
        body,
        media_type=media_type,
        headers={
            "Content-Security-Policy": docs_ui.CSP,
            "Cache-Control": _FOREVER if current else "no-cache",
        },
    )


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
    Route("/docs/assets/{digest}/{path}", docs_asset, methods=["GET"], include_in_schema=False),
]
