"""Accepted booking requests, recorded in PostgreSQL before they are answered 202.

The door queues a request in Redis (``bilten.queue.submit``: claims, Idempotency-Key, stream
entry), then records it here before it answers 202: a 202 is a promise, and Redis alone may
lose it (a flush, a restart without its append-only file, a failover). A request that waits
for its outcome (``Prefer: wait``) is recorded only if its wait ends without one: answered
201 or refused, its booking is final in PostgreSQL already (or it has none to lose), and a
client that got no answer has been promised nothing. Requests that arrive in the
same turn of the event loop are written in one statement (a group commit), so the record costs
one round trip per turn, not one per request. A request refused in Redis (seat taken, key
known, queue full) never reaches PostgreSQL.

A record lives until its request's outcome is known. Recovery
(:func:`bilten.sagas.recovery.redispatch`, every second) deletes the finished ones and puts back
in the stream, in arrival order, every request whose Redis status is gone; the worker treats a
request it sees twice as the same booking.
"""

from __future__ import annotations

from bilten.batching import Batcher
from bilten.db import Pool


class Recorder(Batcher[tuple[str, bytes], None]):
    """Group commit of accepted requests: :meth:`record` returns once its row is committed."""

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool

    async def record(self, request_id: str, payload: bytes) -> None:
        """Record the request ``request_id``, its queue entry encoded as ``payload``."""
        await self.call((request_id, payload))

    async def handle(self, calls: list[tuple[str, bytes]]) -> list[None]:
        await self.pool.execute(
            """INSERT INTO accepted_requests (id, request)
               SELECT * FROM unnest($1::uuid[], $2::bytea[]) ON CONFLICT DO NOTHING""",
            [request_id for request_id, _ in calls],
            [payload for _, payload in calls],
        )
        return [None] * len(calls)
