"""Graceful shutdown: in-flight requests finish before workers stop and pools close."""

import asyncio

import httpx
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bilten import openapi
from bilten.app import create_app
from bilten.cli import make_server
from bilten.state import state
from tests.conftest import free_port


async def test_shutdown_drains_in_flight_requests_before_closing_pools(settings):
    @openapi.endpoint(summary="Slow.", tag="test")
    async def slow(request: Request):
        app = state(request)
        await asyncio.sleep(0.5)
        # Still usable: the pools close only after this request is answered.
        value = await app.db.fetchval("SELECT 41 + 1")
        await app.redis.ping()
        return PlainTextResponse(str(value))

    app = create_app(settings)
    app.router.routes.append(Route("/_test/slow", slow))
    port = free_port()
    server = make_server(settings, "127.0.0.1", port, app=app)
    serving = asyncio.create_task(server.serve())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(100):
            if server.started:
                break
            await asyncio.sleep(0.02)
        in_flight = asyncio.create_task(http.get("/_test/slow"))
        await asyncio.sleep(0.2)
        server.should_exit = True  # what SIGTERM does
        response = await in_flight
        assert response.status_code == 200
        assert response.text == "42"
        await asyncio.wait_for(serving, 10)
        # Once drained, the port no longer accepts connections.
        try:
            await http.get("/health")
            refused = False
        except httpx.ConnectError:
            refused = True
        assert refused
