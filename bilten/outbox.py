"""The transactional outbox: state changes recorded in the same transaction as the change, and
a relay that publishes them to Redis afterwards, in order, at least once.

Topics: ``seats`` (a seat-map delta for an event's room), ``user`` (a message for one user's
channel: booking results, payment status), ``catalog`` (an event whose cached details are
stale). Consumers must tolerate redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import msgspec
from redis.asyncio import Redis

from bilten import keys
from bilten.db import Connection, Pool
from bilten.supervisor import Worker

log = logging.getLogger(__name__)

RELAY_LOCK = 0x6F7574626F78  # "outbox": one relay at a time keeps the order
BATCH = 500
_encoder = msgspec.json.Encoder()


Row = tuple[str, dict[str, Any]]  # topic, payload


async def add(conn: Connection, topic: str, payload: dict[str, Any]) -> None:
    await add_many(conn, [(topic, payload)])


async def add_many(conn: Connection, rows: list[Row]) -> None:
    """Record several changes in one statement."""
    if rows:
        await conn.execute(
            "INSERT INTO outbox (topic, payload) SELECT * FROM unnest($1::text[], $2::jsonb[])",
            [topic for topic, _ in rows],
            [payload for _, payload in rows],
        )


def seat_rows(event_id: str, changes: Iterable[tuple[str, str, int]]) -> list[Row]:
    """The row recording that seats changed, ``(seat_id, status, version)`` each; no row for
    no change."""
    rows = list(changes)
    if not rows:
        return []
    payload = {
        "type": "seats",
        "event_id": event_id,
        "version": max(v for _, _, v in rows),
        "changes": [{"seat_id": s, "status": st, "version": v} for s, st, v in rows],
    }
    return [("seats", payload)]


async def seat_changes(
    conn: Connection, event_id: str, changes: Iterable[tuple[str, str, int]]
) -> None:
    """Record that seats changed: ``(seat_id, status, version)`` each."""
    await add_many(conn, seat_rows(event_id, changes))


async def catalog_changed(conn: Connection, event_id: str) -> None:
    """Record that what an event shows changed (units sold, say): caches everywhere drop it."""
    await add(conn, "catalog", {"event_id": event_id})


def channel_for(topic: str, payload: dict[str, Any]) -> tuple[str, Any]:
    if topic == "seats":
        return keys.seats_channel(payload["event_id"]), payload
    if topic == "user":
        return keys.user_channel(payload["user_id"]), payload["message"]
    raise ValueError(f"unknown outbox topic {topic!r}")


async def relay_once(pool: Pool, redis: Redis, limit: int = BATCH) -> int:
    """Publish the oldest committed rows and delete them; returns how many."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
            return 0
        rows = await conn.fetch("SELECT id, topic, payload FROM outbox ORDER BY id LIMIT $1", limit)
        if not rows:
            return 0
        changed_events = set()
        async with redis.pipeline(transaction=False) as pipe:
            for row in rows:
                if row["topic"] in ("seats", "catalog"):
                    changed_events.add(row["payload"]["event_id"])
                if row["topic"] == "catalog":
                    continue
                channel, message = channel_for(row["topic"], row["payload"])
                pipe.publish(channel, _encoder.encode(message))
            for event_id in changed_events:
                pipe.publish(keys.CATALOG_CHANGED, event_id)
            await pipe.execute()
        # Published first, deleted after: a crash in between publishes again (at least once).
        await conn.execute(
            "DELETE FROM outbox WHERE id = ANY ($1::bigint[])", [r["id"] for r in rows]
        )
        return len(rows)


def relay(pool: Pool, redis: Redis, interval: float = 0.01, idle: float = 0.1) -> Worker:
    """Publish as rows arrive; an idle relay polls ever less often, up to ``idle`` seconds."""

    async def run(stop: asyncio.Event) -> None:
        pause = interval
        while not stop.is_set():
            published = await relay_once(pool, redis)
            if published >= BATCH:
                continue
            pause = interval if published else min(pause * 2, idle)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)

    return run
