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
from collections.abc import Awaitable, Callable, Sequence
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


K = TypeVar("K")
V = TypeVar("V")


class Gathered(Generic[K, V, R]):
    """Handled one at a time, each time all that was handed in meanwhile: while one handling
    runs, the dicts handed in are merged, and the next handling takes them together. Under load
    the batches grow by themselves (one round of statements for what many callers brought);
    alone, a call is handled at once. Each caller gets the results of its own keys (those the
    handler returned). Should a handling of several calls raise, each of them is handled again
    on its own, so that the error stays with the call that caused it. A caller that gives up
    (is cancelled) does not take its items back.

    Every call hands the same ``handle``: it is passed in so that the gatherer can be made
    before what it calls."""

    def __init__(self) -> None:
        self.waiting: list[tuple[dict[K, V], asyncio.Future[dict[K, R]]]] = []
        self.runner: asyncio.Task[None] | None = None

    async def call(
        self, items: dict[K, V], handle: Callable[[dict[K, V]], Awaitable[dict[K, R]]]
    ) -> dict[K, R]:
        future: asyncio.Future[dict[K, R]] = asyncio.get_running_loop().create_future()
        self.waiting.append((items, future))
        if self.runner is None:
            self.runner = asyncio.ensure_future(self._run(handle))
        return await future

    async def _run(self, handle: Callable[[dict[K, V]], Awaitable[dict[K, R]]]) -> None:
        try:
            while self.waiting:
                calls, self.waiting = self.waiting, []
                merged: dict[K, V] = {}
                for items, _ in calls:
                    merged.update(items)
                try:
                    results = await handle(merged)
                except Exception as exc:
                    if len(calls) == 1:
                        if not calls[0][1].done():
                            calls[0][1].set_exception(exc)
                        continue
                    try:
                        for items, future in calls:  # each alone: the error stays with one
                            await self._alone(handle, items, future)
                    except BaseException:
                        for _, future in calls:
                            future.cancel()  # those not handled yet
                        raise
                    continue
                except BaseException:
                    for _, future in calls:
                        future.cancel()
                    raise
                for items, future in calls:
                    if not future.done():
                        future.set_result({k: results[k] for k in items if k in results})
        finally:
            self.runner = None
            for _, future in self.waiting:  # cancelled while calls were waiting
                future.cancel()
            self.waiting = []

    @staticmethod
    async def _alone(
        handle: Callable[[dict[K, V]], Awaitable[dict[K, R]]],
        items: dict[K, V],
        future: asyncio.Future[dict[K, R]],
    ) -> None:
        try:
            results = await handle(items)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result({k: results[k] for k in items if k in results})
