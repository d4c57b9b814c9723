"""The ASGI layers in front of the router: one for every request, one more for the API budget.

Starlette would put two of its own around ours (``ServerErrorMiddleware`` outermost,
``ExceptionMiddleware`` innermost); :class:`Front` does what both did here, so a request passes
one layer and one ``send`` wrapper before the router instead of four and three. Every layer
costs a coroutine and a closure per request, which a cached read (tens of microseconds in all)
notices.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bilten import errors, logs, metrics, ratelimit
from bilten.errors import ApiError

log = logging.getLogger(__name__)

Handler = Callable[[Request, Exception], Awaitable[Response]]

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


class ApiBudget:
    """The general per-IP request budget of the API, shared by all instances (``bilten.budget``:
    counted locally, reconciled with Redis every few milliseconds).

    Inside CORS, so that a refusal carries the headers a browser needs to read it. Operations
    endpoints are exempt (load balancers and scrapers poll them), and so are the web app's page
    and static files (served from memory; the API calls the page makes count).
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
            outcome = await budget.hit(ratelimit.subject(client[0]) if client else "-")
            if not outcome.allowed:
                await errors.response(ratelimit.limited(outcome))(scope, receive, send)
                return
        await self.app(scope, receive, send)


# On every response. A page that needs more (the API docs) sends its own policy.
_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
_CSP = b"content-security-policy"
_STRICT_CSP = (_CSP, b"default-src 'none'; frame-ancestors 'none'")
_HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


class Front:
    """Outermost: WebSocket shortcuts, request ids, metrics, security headers, and the error
    shape for whatever the handlers did not answer themselves.

    ``sockets``: WebSocket paths taken straight to their endpoint, before anything else (tens of
    thousands of idle connections each keep the frames of every layer they went through).
    ``handlers``: exception handlers by class, as Starlette takes them; those raised by a route's
    handler are answered by the route (``starlette.exception_handlers`` in the scope, Starlette's
    own convention), those raised before it (the router's 404 and 405) here. ``hsts``: the site is
    served over https (``BILTEN_PUBLIC_URL``), so browsers are told to keep to it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        handlers: Mapping[Any, Handler],
        sockets: Mapping[str, ASGIApp] | None = None,
        hsts: bool = False,
    ) -> None:
        self.app = app
        self.sockets = dict(sockets or {})
        self.handlers: dict[Any, Handler] = dict(handlers)
        # What Starlette's ExceptionMiddleware puts in the scope: handlers by class, by status.
        self.exception_handlers: tuple[dict[Any, Handler], dict[int, Handler]] = (self.handlers, {})
        extra = (*_SECURITY_HEADERS, *((_HSTS,) if hsts else ()))
        self.headers = [*extra, _STRICT_CSP]  # appended to every response
        self.headers_own_policy = list(extra)  # to one that brings its own policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            rid = _incoming_request_id(scope)
            token = logs.request_id.set(rid)
            try:
                await self._http(scope, receive, send, rid)
            finally:
                logs.request_id.reset(token)
        elif kind == "websocket" and scope["path"] in self.sockets:
            await self.sockets[scope["path"]](scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        status = 500
        started = False
        request_id = (REQUEST_ID_HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", ()))
                extra = self.headers
                for name, _ in headers:
                    if name.lower() == _CSP:
                        extra = self.headers_own_policy
                        break
                headers.append(request_id)
                headers += extra
                message["headers"] = headers
            await send(message)

        scope["starlette.exception_handlers"] = self.exception_handlers
        figures = metrics.HTTP
        figures.in_flight += 1
        begun = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = 499  # gone before its body was read: no one to answer, nothing wrong here
        except Exception as exc:
            response = await self._answer(scope, exc, rid, started)
            if response is not None:
                await response(scope, receive, send_with_id)
        finally:
            figures.in_flight -= 1
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            figures.record(method, route_template(scope), status, time.perf_counter() - begun)

    async def _answer(
        self, scope: Scope, exc: Exception, rid: str, started: bool
    ) -> Response | None:
        """The response for an exception no handler below answered; None once one has begun."""
        handler = next(
            (self.handlers[cls] for cls in type(exc).__mro__ if cls in self.handlers), None
        )
        if handler is not None and not started:
            return await handler(Request(scope), exc)
        if isinstance(exc, errors.UNAVAILABLE):
            # PostgreSQL or Redis out of reach, or no connection free in time: the client may
            # retry; this is overload or an outage, not a bug.
            log.warning("%s %s: %s: %s", scope["method"], scope["path"], type(exc).__name__, exc)
            error = ApiError(
                "unavailable",
                "A service Bilten depends on is unavailable or busy; try again shortly.",
                {"request_id": rid},
                headers={"Retry-After": "2"},
            )
        else:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            error = ApiError("internal_error", "Internal server error.", {"request_id": rid})
        return None if started else errors.response(error)


def _first_segment(path: str) -> str:
    return path[1:].partition("/")[0]


class Routes(Router):
    """Starlette's router, trying first only the routes that can match the path's first segment.

    Starlette tries every route in order until one matches, so a path near the end of the table
    (``/health``, say) paid for fifty regular expressions. The routes whose first segment is
    fixed are filed under it; the others (none today) are tried for every path. When none of
    the path's routes matches in full, Starlette's own search over all routes answers (a 405, a
    redirect to the path with or without its trailing slash, a 404), so the outcome is the one
    Starlette gives.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filed: dict[str, list[BaseRoute]] = {}
        self.anywhere: list[BaseRoute] = []
        self.filed_count = -1  # routes may be added after the app is made (tests do)

    def _file(self) -> None:
        self.filed, self.anywhere = {}, []
        for route in self.routes:
            path = getattr(route, "path", "")
            first = _first_segment(path) if path.startswith("/") else "{"
            if "{" in first:
                self.anywhere.append(route)
                for routes in self.filed.values():
                    routes.append(route)
            else:
                self.filed.setdefault(first, list(self.anywhere)).append(route)
        self.filed_count = len(self.routes)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" and not scope.get("root_path"):
            if self.filed_count != len(self.routes):
                self._file()
            for route in self.filed.get(_first_segment(scope["path"]), self.anywhere):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.setdefault("router", self)
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)


class App(Starlette):
    """Starlette with :class:`Front` in place of its own outer and inner middleware (the
    middleware given is applied inside it, in order; ``sockets`` and ``hsts`` go to ``Front``)
    and :class:`Routes` as its router."""

    def __init__(
        self,
        *,
        routes: list[BaseRoute],
        lifespan: Any,
        sockets: Mapping[str, ASGIApp] | None = None,
        hsts: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.router = Routes(routes, lifespan=lifespan)
        self.sockets = sockets
        self.hsts = hsts

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = self.router
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return Front(app, handlers=self.exception_handlers, sockets=self.sockets, hsts=self.hsts)
