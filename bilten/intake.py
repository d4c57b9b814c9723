"""Accepted booking requests, recorded in PostgreSQL before they are answered 202.

The door queues a request in Redis (``bilten.queue.submit``: claims, Idempotency-Key, stream
entry), then records it here before it answers: a 202 is a promise, and Redis alone may lose
it (a flush, a restart without its append-only file, a failover). Requests that arrive in the
same turn of the event loop are written in one statement (a group commit), so the record costs
one round trip per turn, not one per request. A request refused in Redis (seat taken, key
known, queue full) never reaches PostgreSQL.

A record lives until its request's outcome is known. Recovery
(:func:`bilten.sagas.recovery.redispatch`, every second) deletes the finished ones and puts back
in the stream, in arrival order, every request whose Redis status is gone; the worker treats a
request it sees twice as the same booking.
"""

from __future__ import annotations

import asyncio

from bilten.db import Pool

_Call = tuple[str, bytes, "asyncio.Future[None]"]


class Recorder:
    """Group commit of accepted requests: :meth:`record` returns once its row is committed."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.pending: list[_Call] = []
        self.writing: set[asyncio.Task[None]] = set()

    async def record(self, request_id: str, payload: bytes) -> None:
        """Record the request ``request_id``, its queue entry encoded as ``payload``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((request_id, payload, future))
        await future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._write(batch))
        self.writing.add(task)
        task.add_done_callback(self.writing.discard)

    async def _write(self, batch: list[_Call]) -> None:
        try:
            await self.pool.execute(
                """INSERT INTO accepted_requests (id, request)
                   SELECT * FROM unnest($1::uuid[], $2::bytea[]) ON CONFLICT DO NOTHING""",
                [request_id for request_id, _, _ in batch],
                [payload for _, payload, _ in batch],
            )
        except BaseException as exc:  # PostgreSQL out of reach: every caller answers 503
            for _, _, future in batch:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for _, _, future in batch:
            if not future.done():
                future.set_result(None)
