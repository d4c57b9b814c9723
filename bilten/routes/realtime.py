"""The WebSocket endpoint of the realtime hub, and its figures across instances.

Tens of thousands of sockets stay open for hours, so each one's resting cost counts: the
outermost middleware takes ``/ws`` straight to the hub (:data:`sockets`), past the router
(whose coroutines would otherwise stay suspended under every idle connection).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from bilten import errors, openapi, security
from bilten.errors import ApiError
from bilten.realtime import Realtime, stats
from bilten.state import state
from bilten.wire import JSONResponse
from bilten.workers import heartbeat

PATH = "/ws"
POLICY_VIOLATION = 1008


def _caller(websocket: WebSocket) -> security.Principal | None:
    """From ``?token=`` or ``Authorization: Bearer``; None when neither is given."""
    token = websocket.query_params.get("token")
    if token is None:
        token = security.bearer(websocket)
    return None if token is None else security.principal_from_token(websocket, token)


async def _refuse(websocket: WebSocket, exc: ApiError) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(errors.response(exc))
    else:
        await websocket.close(POLICY_VIOLATION, exc.message)


def hub(conn: HTTPConnection) -> Realtime:
    """This instance's WebSocket hub (beside the state: the hub reads the state, not back)."""
    value: Any = conn.state.realtime
    assert isinstance(value, Realtime)
    return value


def _socket(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
    """The connection's whole life, or its refusal. Not a coroutine itself: one frame less
    held under every open connection, and nothing of the handshake kept once it is done."""
    websocket = WebSocket(scope, receive, send)
    app = state(websocket)
    origins = app.settings.ws_origins
    if origins and websocket.headers.get("origin", "").rstrip("/") not in origins:
        return _refuse(websocket, ApiError("forbidden", "This origin may not connect."))
    try:
        who = _caller(websocket)
    except ApiError as exc:
        return _refuse(websocket, exc)
    return hub(websocket).serve(app, who, scope, receive, send)


@openapi.endpoint(
    summary="WebSocket: live seat maps and personal messages (see the Realtime section).",
    tag="realtime",
    status=101,
    query=(("token", "string", "an access token; or Authorization: Bearer, or an auth message"),),
    errors=("unauthorized",),
    description="Anonymous connections may watch published events' seat maps; an "
    "authenticated one also receives its user's messages. A bad token is refused with 401 "
    "before the upgrade. A room sends `seats.snapshot`, then `seats` deltas (versioned), and "
    "`seats.claimed` / `seats.released` (no version): seats asked for by queued bookings, and "
    'given back unsold. `{"type": "subscribe", "room": "event:<id>", "indexed": true}` '
    "names seats by their index in the snapshot's `seats` list instead, in a sixth of the bytes: "
    "`seats.indexed` `{event_id, version, changes: {status: [index, age, ...]}}` (a change's "
    "version is `version - age`) for `seats`, and `claims.indexed` `{event_id, claimed: [index], "
    "released: [index]}` for the news of claims. A snapshot for such a subscriber that holds the "
    "seats' order (it gave a `version`, or had a snapshot) comes as a `seats.indexed` naming "
    "every seat.",
)
class SocketEndpoint:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _socket(scope, receive, send)


@openapi.endpoint(
    summary="WebSocket figures of every live instance (admins).",
    tag="realtime",
    response=stats.RealtimeStats,
    auth=True,
    errors=("forbidden",),
)
async def realtime_stats(request: Request) -> Response:
    security.require(request, "admin")
    app = state(request)
    entries = await heartbeat.live_instances(app)
    return JSONResponse(stats.collect(entries, hub(request)))


# Served by the outermost middleware of an instance with the realtime role (bilten.middleware);
# the route documents it.
sockets: dict[str, ASGIApp] = {PATH: _socket}
socket_routes = [WebSocketRoute(PATH, SocketEndpoint())]
routes = [Route("/realtime/stats", realtime_stats, methods=["GET"])]
