"""Requests parked until something happens elsewhere: ``Prefer: wait=N`` on bookings.

A saga that ends publishes ``<request id>\\n<outcome>``; every instance's pub/sub hub hands it
to :meth:`Waiters.on_message`, which wakes the requests waiting for that request on this
instance with the outcome itself, so they answer without reading it back. Nothing polls.
"""

from __future__ import annotations

import asyncio


class Waiters:
    def __init__(self) -> None:
        self.futures: dict[str, set[asyncio.Future[bytes]]] = {}

    def register(self, key: str) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.futures.setdefault(key, set()).add(future)
        return future

    def discard(self, key: str, future: asyncio.Future[bytes]) -> None:
        waiting = self.futures.get(key)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self.futures[key]

    def resolve(self, key: str, outcome: bytes = b"") -> None:
        for future in self.futures.pop(key, ()):
            if not future.done():
                future.set_result(outcome)

    def on_message(self, data: bytes) -> None:
        key, _, outcome = data.partition(b"\n")
        if key.decode() in self.futures:
            self.resolve(key.decode(), outcome)
