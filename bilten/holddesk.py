"""Seat clicks, batched: the holds asked for in the same turn of the event loop are made in one
transaction of set-based statements (:func:`bilten.holds.create_many`), each hold still all or
nothing on its own, in arrival order.

One transaction per batch instead of one per click: the per-person checks, seat locks, the
seat update, the hold rows and the outbox rows each cost one statement for the whole batch, and
one commit. Requests for seats already taken are refused before it, by one read of the seats
without a lock (:func:`bilten.holds.refuse_taken`): a click on a held or sold seat costs a share
of one indexed read and takes no lock, whatever the sale's load. Should the batch fail for a
reason of its own (not a refusal, which is a result), each of its holds is tried again alone,
so one bad request fails only itself. Batches run side by side on pooled connections; their
locks follow the one lock order, so they cannot deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from redis.asyncio import Redis

from bilten import cache, holds
from bilten.batching import Batcher
from bilten.db import Connection, Pool
from bilten.errors import UNAVAILABLE, ApiError

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
            refused = await self._refuse_taken(conn, wants)
            rest = [w for n, w in enumerate(wants) if n not in refused]
            try:
                made = await self._create(conn, rest) if rest else []
            except UNAVAILABLE as exc:  # PostgreSQL went away: 503 for those not yet refused
                made = [exc] * len(rest)
        answers = iter(made)
        results = [refused[n] if n in refused else next(answers) for n in range(len(wants))]
        for event_id in sorted({r.event_id for r in results if isinstance(r, holds.Hold)}):
            await cache.changed(self.redis, self.caches, event_id)
        return results

    async def _refuse_taken(self, conn: Connection, wants: list[holds.Want]) -> dict[int, ApiError]:
        try:
            return await holds.refuse_taken(conn, wants)
        except UNAVAILABLE:
            raise
        except Exception:  # the locking path judges them all, one by one if it must
            log.exception("the taken-seat check of %d holds failed", len(wants))
            return {}

    async def _create(
        self, conn: Connection, wants: list[holds.Want]
    ) -> list[holds.Hold | Exception]:
        """One transaction for the batch; should it fail for a reason of its own, one each."""
        try:
            async with conn.transaction():
                return list(await holds.create_many(conn, wants, self.ttl))
        except UNAVAILABLE:
            raise
        except Exception as exc:
            if len(wants) == 1:
                return [exc]
            log.exception("a batch of %d holds failed; each is tried alone", len(wants))
        results: list[holds.Hold | Exception] = []
        for want in wants:
            try:
                async with conn.transaction():
                    results += await holds.create_many(conn, [want], self.ttl)
            except UNAVAILABLE:
                raise
            except Exception as exc:
                results.append(exc)
        return results
