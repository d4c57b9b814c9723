"""The booking queue: one Redis stream per event, drained by workers on every instance.

All instances form one consumer group. A worker takes an event by a lease (a key with an
expiry that it renews), so one event's requests are processed in arrival order, while other
events proceed on other workers. Entries are acknowledged only when their saga has ended. A new
lease holder first claims whatever the previous holder left pending (``XAUTOCLAIM``): a dead
instance loses nothing, and the sagas' own state checks make a second run harmless.
Positions are counters: ``ticket`` (enqueued) minus ``served`` (finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bilten import keys, metrics
from bilten.errors import ApiError
from bilten.state import State
from bilten.supervisor import Worker

log = logging.getLogger(__name__)

RunBatch = Callable[[State, list[str]], Awaitable[list[Any]]]
Announce = Callable[[State, list[Any]], Awaitable[None]]

BATCH = 50
IDLE_SLEEP = (0.005, 0.1)

# Delete the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


# KEYS: ticket, served, stream, active set, request status.
# ARGV: request id, event id, maximum, user id.
# Returns {position, depth}; position -1 when the queue is full.
_ENQUEUE = """
local served = tonumber(redis.call('GET', KEYS[2]) or '0')
local waiting = tonumber(redis.call('GET', KEYS[1]) or '0') - served
if waiting >= tonumber(ARGV[3]) then return {-1, waiting} end
local ticket = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('HSET', KEYS[5], 'status', 'queued', 'event_id', ARGV[2], 'ticket', ticket,
           'user_id', ARGV[4])
redis.call('EXPIRE', KEYS[5], 86400)
return {ticket - served, waiting + 1}
"""


async def enqueue(redis: Redis, event_id: str, request_id: str, user_id: str, maximum: int) -> int:
    """Append a request atomically; returns its position (1 = next). 503 when full."""
    position, waiting = await redis.eval(
        _ENQUEUE,
        5,
        keys.queue_ticket(event_id),
        keys.queue_served(event_id),
        keys.queue(event_id),
        keys.QUEUE_ACTIVE,
        keys.booking_request(request_id),
        request_id,
        event_id,
        maximum,
        user_id,
    )
    metrics.QUEUE_DEPTH.set(waiting)
    if position < 0:
        raise ApiError(
            "unavailable",
            "The booking queue for this event is full; try again shortly.",
            {"queue_depth": waiting},
            headers={"Retry-After": "2"},
        )
    return int(position)


async def position(redis: Redis, event_id: str, ticket: int) -> int:
    served = await redis.get(keys.queue_served(event_id))
    return max(0, ticket - int(served or 0))


async def _ensure_group(redis: Redis, stream: str) -> None:
    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
        await redis.xgroup_create(stream, keys.QUEUE_GROUP, id="0", mkstream=True)


def _ids(entries: Any) -> list[tuple[bytes, str]]:
    return [(entry_id, fields[b"id"].decode()) for entry_id, fields in entries if fields]


async def drain(
    app: State,
    event_id: str,
    consumer: str,
    run_batch: RunBatch,
    announce: Announce,
    stop: asyncio.Event | None = None,
) -> int:
    """Process the event's queue while we hold its lease (and until ``stop``, after the batch
    in hand); returns requests finished."""
    redis = app.redis
    stream = keys.queue(event_id)
    lease = keys.queue_lease(event_id)
    await _ensure_group(redis, stream)
    done = 0
    # Entries a previous holder read but never acknowledged come first: they arrived first.
    backlog: list[tuple[bytes, str]] = []
    cursor: Any = "0-0"
    while True:
        # Redis 6.2 answers [cursor, entries]; 7 adds the ids of deleted entries.
        answer: Any = await redis.xautoclaim(
            stream, keys.QUEUE_GROUP, consumer, 0, cursor, count=500
        )
        cursor = answer[0]
        backlog += _ids(answer[1])
        if cursor in (b"0-0", "0-0"):
            break
    while True:
        if backlog:
            batch, backlog = backlog[:BATCH], backlog[BATCH:]
        else:
            read: Any = await redis.xreadgroup(
                keys.QUEUE_GROUP, consumer, {stream: ">"}, count=BATCH
            )
            batch = _ids(read[0][1]) if read else []
        if not batch:
            return done
        outcomes = await run_batch(app, [request_id for _, request_id in batch])
        finished = [
            entry_id
            for (entry_id, _), outcome in zip(batch, outcomes, strict=True)
            if outcome is None or outcome.state in ("CONFIRMED", "FAILED", "CANCELLED")
        ]
        await announce(app, [o for o in outcomes if o is not None])
        if finished:
            # Served counts what this worker acknowledged: an entry another worker already
            # acknowledged (after a lease changed hands) is not counted twice.
            acked = await redis.xack(stream, keys.QUEUE_GROUP, *finished)
            async with redis.pipeline(transaction=False) as pipe:
                pipe.xdel(stream, *finished)
                if acked:
                    pipe.incrby(keys.queue_served(event_id), acked)
                await pipe.execute()
            done += len(finished)
        if stop is not None and stop.is_set():
            return done  # shutting down: what is left stays queued for another worker
        if not await redis.eval(_RENEW, 1, lease, consumer, app.settings.queue_lease_ms):
            return done  # the lease was lost: someone else drains now


def worker(app: State, run_batch: RunBatch, announce: Announce) -> Worker:
    consumer = f"{app.settings.instance_id}-{secrets.token_hex(3)}"

    async def run(stop: asyncio.Event) -> None:
        idle = IDLE_SLEEP[0]
        while not stop.is_set():
            members: Any = await app.redis.smembers(keys.QUEUE_ACTIVE)
            events = [e.decode() for e in members]
            random.shuffle(events)
            worked = False
            for event_id in events:
                lease = keys.queue_lease(event_id)
                if not await app.redis.set(
                    lease, consumer, nx=True, px=app.settings.queue_lease_ms
                ):
                    continue
                try:
                    finished = await drain(app, event_id, consumer, run_batch, announce, stop)
                    worked = finished > 0 or worked
                    stream = keys.queue(event_id)
                    if await app.redis.xlen(stream) == 0:
                        # Removed, then checked again: a request enqueued in between re-adds it.
                        await app.redis.srem(keys.QUEUE_ACTIVE, event_id)
                        if await app.redis.xlen(stream):
                            await app.redis.sadd(keys.QUEUE_ACTIVE, event_id)
                finally:
                    await app.redis.eval(_RELEASE, 1, lease, consumer)
                if stop.is_set():
                    return
            idle = IDLE_SLEEP[0] if worked else min(idle * 2, IDLE_SLEEP[1])
            if not worked:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), idle)

    return run
