"""Calls made in one turn of the event loop, handled together.

Under load, thousands of requests want the same kind of round trip at the same moment (a Redis
script, an INSERT). Made one by one, each waits in line for a pooled connection and then pays
its own round trip. Gathered per turn of the event loop and sent as one (a pipeline, one
statement), they cost one round trip for all, while each caller still gets its own result or
error. A caller that gives up (is cancelled) does not take its call back: as with a single call
already sent, it may still be carried out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Subclasses say how a batch is handled: :meth:`handle` returns a result (or an exception
    to raise) per call, in order; an exception it raises fails every call of the batch."""

    def __init__(self) -> None:
        self.pending: list[tuple[T, asyncio.Future[R]]] = []
        self.running: set[asyncio.Task[None]] = set()

    async def handle(self, calls: list[T]) -> Sequence[R | Exception]:
        raise NotImplementedError

    async def call(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((item, future))
        return await future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._run(batch))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.handle([item for item, _ in batch])
        except BaseException as exc:  # the connection, say: every call of the batch failed
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller gave up
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
