"""Sessions that end at once: revoked session ids, known to every instance without a round trip.

A session is a refresh-token family; its id (``sid``) is in every access token issued for it.
Revoking one (logout, a password reset, a role change) records the id in a Redis sorted set,
until the last access token that may carry it has expired, and announces it on a channel.
Each instance keeps the ids in memory: filled from the set whenever its pub/sub connection
(re)starts, so a message missed while it was down is not missed for good, and kept current by
the announcements. Checking a token's session is then a set lookup, on every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from redis.asyncio import Redis

from bilten import keys, pubsub
from bilten.pubsub import Hub

log = logging.getLogger(__name__)

SWEEP_ABOVE = 1000  # revocations remembered before those that no longer matter are swept out


class Revocations:
    def __init__(self, redis: Redis, keep: int) -> None:
        self.redis = redis
        self.keep = keep  # seconds a revocation matters: the access tokens' lifetime
        self.ended: dict[str, float] = {}  # sid -> until when it matters
        self.sweep_above = SWEEP_ABOVE  # twice what the last sweep kept (amortised O(1))
        self.listeners: list[Callable[[set[str]], None]] = []
        self._loading: set[asyncio.Task[None]] = set()

    def __contains__(self, sid: str) -> bool:
        until = self.ended.get(sid)
        return until is not None and until > time.time()

    async def revoke(self, sids: Iterable[str]) -> None:
        ids = [s for s in sids if s]
        if not ids:
            return
        until = time.time() + self.keep
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.REVOKED_SESSIONS, dict.fromkeys(ids, until))
            pipe.zremrangebyscore(keys.REVOKED_SESSIONS, "-inf", time.time())
            pubsub.publish(pipe, keys.REVOKED_CHANNEL, " ".join(ids))
            await pipe.execute()
        self._add(ids, until)

    async def attach(self, hub: Hub) -> None:
        await hub.subscribe(keys.REVOKED_CHANNEL, self._on_message)
        hub.on_connect.append(self._reload)

    def _on_message(self, data: bytes) -> None:
        self._add(data.decode().split(), time.time() + self.keep)

    def _add(self, sids: list[str], until: float) -> None:
        if len(self.ended) > self.sweep_above:
            self._sweep()
        # Listeners hear of a session once: the same logout posted again, or this instance's
        # own announcement coming back, costs them nothing (they may scan every socket).
        fresh = {sid for sid in sids if sid not in self}
        for sid in sids:
            self.ended[sid] = max(until, self.ended.get(sid, 0.0))
        if fresh:
            for listener in self.listeners:
                listener(fresh)

    def _sweep(self) -> None:
        """Forget the revocations that no longer matter (their tokens expired)."""
        now = time.time()
        self.ended = {s: u for s, u in self.ended.items() if u > now}
        self.sweep_above = max(SWEEP_ABOVE, 2 * len(self.ended))

    def _reload(self) -> None:
        task = asyncio.ensure_future(self._load())
        self._loading.add(task)
        task.add_done_callback(self._loading.discard)

    async def _load(self) -> None:
        try:
            found: list[tuple[bytes, float]] = await self.redis.zrangebyscore(
                keys.REVOKED_SESSIONS, time.time(), "+inf", withscores=True
            )  # type: ignore[assignment]
        except Exception:
            log.warning("could not load revoked sessions", exc_info=True)
            return
        self._sweep()
        for sid, until in found:
            self.ended[sid.decode()] = float(until)
        for listener in self.listeners:
            listener(set(self.ended))
