"""Requests parked until something happens elsewhere: ``Prefer: wait=N`` on bookings.

Workers publish the requests whose sagas ended, a line ``<request id> <outcome>`` each, one
message per batch; every instance's pub/sub hub hands it to :meth:`Waiters.on_message`, which
wakes the requests waiting on this instance with the outcome itself, so they answer without
reading it back. Nothing polls.
"""

from __future__ import annotations

import asyncio


class Waiters:
    def __init__(self) -> None:
        # Resolved with the outcome (b"": answer with what is known), or by the waiter's own
        # timer with None.
        self.futures: dict[str, set[asyncio.Future[bytes | None]]] = {}
        self.closed = False

    def register(self, key: str) -> asyncio.Future[bytes | None]:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_result(b"")  # shutting down: nobody parks any more
        else:
            self.futures.setdefault(key, set()).add(future)
        return future

    def release_all(self) -> None:
        """The process is stopping: every parked request answers now with what is known (202
        while its booking is under way), so the stop need not wait for their timeouts."""
        self.closed = True
        for key in list(self.futures):
            self.resolve(key)

    def discard(self, key: str, future: asyncio.Future[bytes | None]) -> None:
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
        if not self.futures:
            return
        for line in data.split(b"\n"):
            key, _, outcome = line.partition(b" ")
            request_id = key.decode()
            if request_id in self.futures:
                self.resolve(request_id, outcome)
