"""uvicorn's sans-I/O WebSocket protocol, lighter at rest.

Tens of thousands of sockets mostly wait, so what each one keeps while it waits counts. The
protocol uvicorn builds per socket keeps an ``asyncio.Queue`` for what the client sends (three
deques and an event with a fourth: about 3 KiB, for a queue that holds one message now and
then), an ``asyncio.Event`` for "the socket may take more" (one more deque), and, for the whole
life of the socket, the handshake's request and response with their headers and the request
path (the access token in ``?token=`` included). This subclass gives it a one-reader inbox and a
flag that allocate nothing until someone waits, and lets go of the handshake once it is done
(the parser of the ``websockets`` library keeps the request object itself, so its headers and
path are emptied in place).

Everything else is uvicorn's. :mod:`bilten.realtime.wire` writes ready frames past it, as it
does past uvicorn's own class. ``bilten serve`` passes this class as uvicorn's ``ws``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger(__name__)


class Inbox:
    """``asyncio.Queue`` as uvicorn uses it: ``put_nowait``, ``get`` by one reader, ``empty``."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.pop(0)

    def empty(self) -> bool:
        return not self.items

    def qsize(self) -> int:
        return len(self.items)


class Flag:
    """``asyncio.Event`` as uvicorn uses it, set at first; its waiters list only while one waits."""

    __slots__ = ("value", "waiters")

    def __init__(self) -> None:
        self.value = True
        self.waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self.value

    def set(self) -> None:
        if self.value:
            return
        self.value = True
        waiters, self.waiters = self.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self.value = False

    async def wait(self) -> bool:
        if self.value:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = []
        self.waiters.append(waiter)
        try:
            await waiter
        finally:
            if self.waiters is not None and waiter in self.waiters:
                self.waiters.remove(waiter)
        return True


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue: Any = Inbox()
        self.writable: Any = Flag()

    def start_keepalive(self) -> None:
        # Called once, as the handshake completes (so no layer is added to every send).
        super().start_keepalive()
        self.forget_handshake()

    def forget_handshake(self) -> None:
        """The handshake's request and response are not needed once the socket is open."""
        request: Any = getattr(self, "request", None)
        response: Any = getattr(self, "response", None)
        self.request: Any = None
        self.response: Any = None
        try:
            if request is not None:
                request.headers.clear()
                request.path = ""
            if response is not None:
                response.headers.clear()
        except (AttributeError, TypeError):  # another websockets version: they stay, no harm
            log.debug("the handshake's request stays", exc_info=True)
