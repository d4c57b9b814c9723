"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document and its viewer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import re
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


def _inline_hashes(page: bytes, tag: bytes) -> str:
    """CSP sources allowing exactly the page's inline ``tag`` blocks, by their hashes."""
    blocks = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.S)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks
    )


# The page may run its own script and style and fetch from this origin, nothing else.
_DOCS_CSP = (
    f"default-src 'none'; script-src {_inline_hashes(_DOCS_PAGE, b'script')}; "
    f"style-src {_inline_hashes(_DOCS_PAGE, b'style')}; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


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
        spec = openapi.document(request.app.routes, title="Bilten", version=__version__)
        cached = request.app.state.openapi = JSONResponse(spec).body
    return Response(cached, media_type="application/json")


@openapi.endpoint(
    summary="A page that renders the OpenAPI document (no outside resources).",
    tag="operations",
    content_type="text/html",
)
async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS_PAGE, headers={"Content-Security-Policy": _DOCS_CSP})


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]
