"""Requests parked until something happens elsewhere: ``Prefer: wait=N`` on bookings.

A saga that ends publishes the booking id; every instance's pub/sub hub hands it to
:meth:`Waiters.resolve`, which wakes the requests waiting for it on that instance. Nothing polls.
"""

from __future__ import annotations

import asyncio


class Waiters:
    def __init__(self) -> None:
        self.futures: dict[str, set[asyncio.Future[None]]] = {}

    def register(self, key: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures.setdefault(key, set()).add(future)
        return future

    def discard(self, key: str, future: asyncio.Future[None]) -> None:
        waiting = self.futures.get(key)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self.futures[key]

    def resolve(self, key: str) -> None:
        for future in self.futures.pop(key, ()):
            if not future.done():
                future.set_result(None)

    def on_message(self, data: bytes) -> None:
        self.resolve(data.decode())
