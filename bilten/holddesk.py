"""Seat clicks, batched: the holds asked for in the same turn of the event loop are made in one
transaction of set-based statements (:func:`bilten.holds.create_many`), each hold still all or
nothing on its own, in arrival order.

One transaction per batch instead of one per click: the per-person checks, seat locks, the
seat update, the hold rows and the outbox rows each cost one statement for the whole batch, and
one commit. Should the batch fail for a reason of its own (not a refusal, which is a result),
each of its holds is tried again alone, so one bad request fails only itself. Batches run side
by side on pooled connections; their locks follow the one lock order, so they cannot deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from redis.asyncio import Redis

from bilten import cache, holds
from bilten.batching import Batcher
from bilten.db import Pool
from bilten.errors import UNAVAILABLE

log = logging.getLogger(__name__)


class HoldDesk(Batcher[holds.Want, holds.Hold]):
    def __init__(self, pool: Pool, redis: Redis, caches: cache.Caches, ttl: int) -> None:
        super().__init__()
        self.pool = pool
        self.redis = redis
        self.caches = caches
        self.ttl = ttl

    async def hold(self, want: holds.Want) -> holds.Hold:
        """The hold, or the API error that refused it (raised)."""
        return await self.call(want)

    async def handle(self, wants: list[holds.Want]) -> Sequence[holds.Hold | Exception]:
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    results: list[holds.Hold | Exception] = list(
                        await holds.create_many(conn, wants, self.ttl)
                    )
            except UNAVAILABLE:
                raise  # PostgreSQL is away: every hold of the batch gets 503
            except Exception:
                if len(wants) == 1:
                    raise
                log.exception("a batch of %d holds failed; each is tried alone", len(wants))
                results = []
                for want in wants:
                    try:
                        async with conn.transaction():
                            results += await holds.create_many(conn, [want], self.ttl)
                    except UNAVAILABLE:
                        raise
                    except Exception as exc:
                        results.append(exc)
        for event_id in sorted({r.event_id for r in results if isinstance(r, holds.Hold)}):
            await cache.changed(self.redis, self.caches, event_id)
        return results
