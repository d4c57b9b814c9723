"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document and its viewer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from bilten import __version__, metrics, openapi
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
_DOCS_PAGE = (Path(__file__).parent / "docs.html").read_bytes()


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
)
async def prometheus(request: Request) -> Response:
    return Response(metrics.generate_latest(), media_type=metrics.CONTENT_TYPE)


@openapi.endpoint(summary="This OpenAPI 3.1 document.", tag="operations")
async def openapi_json(request: Request) -> Response:
    cached = getattr(request.app.state, "openapi", None)
    if cached is None:
        spec = openapi.document(request.app.routes, title="Bilten", version=__version__)
        cached = request.app.state.openapi = JSONResponse(spec).body
    return Response(cached, media_type="application/json")


@openapi.endpoint(
    summary="A page that renders the OpenAPI document (no outside resources).",
    tag="operations",
    content_type="text/html",
)
async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS_PAGE)


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]
