"""The booking worker: consumes the per-event queues that ``bilten.queue`` fills.

All instances form one consumer group. A worker takes an event by a lease (a key with an
expiry that it renews), so one event's requests are processed in arrival order, while other
events proceed on other workers. Entries are acknowledged only when their saga has ended, or
when it is someone else's to end (another worker's, or recovery's). A new
lease holder first claims whatever the previous holder left pending (``XAUTOCLAIM``): a dead
instance loses nothing, and the sagas' own state checks make a second run harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio.client import Pipeline

from bilten import errors, keys, queue
from bilten.queue import Entry
from bilten.state import State
from bilten.supervisor import Worker

log = logging.getLogger(__name__)

# A batch's first step (bookings made, seats reserved), returning the rest (payments, finish),
# which yields waves of entries with their outcomes as their sagas end.
Rest = Callable[[], AsyncIterator[list[tuple[Entry, Any]]]]
Begin = Callable[[State, list[Entry]], Awaitable[Rest]]
# Queues the outcomes' announcements (statuses, wake-ups) on a pipeline.
Announce = Callable[[Pipeline, list[Any]], None]


BATCH = 200
LOOK_AGAIN = 0.02  # seconds between looks at an empty queue while batches still pay
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

# Finished entries, in one atomic step: acknowledged, deleted, and counted as served. Served
# counts only what this call acknowledged: an entry another worker acknowledged already (after
# a lease changed hands) is not counted twice. KEYS: stream, served. ARGV: group, entry ids...
_DONE = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
if acked > 0 then redis.call('INCRBY', KEYS[2], acked) end
return acked
"""


async def drain(
    app: State,
    event_id: str,
    consumer: str,
    begin: Begin,
    announce: Announce,
    stop: asyncio.Event | None = None,
) -> int:
    """Process the event's queue while we hold its lease (and until ``stop``, after the batches
    in hand); returns requests finished.

    Payments are off the ordering path: while earlier batches pay and finish, later ones'
    seats are reserved, each only after the one before committed its reservations, so what is
    free goes to requests in arrival order (what an earlier batch's failed payments give back
    comes free only after that). Up to ``queue_in_flight`` batches pay at once; a slow or hung
    charge holds up its own batch, and the queue only once that many are held up.
    """
    redis = app.redis
    stream = keys.queue(event_id)
    lease = keys.queue_lease(event_id)
    await queue.ensure_group(redis, stream)
    done = 0
    # Entries a previous holder read but never acknowledged come first: they arrived first.
    backlog: list[Entry] = []
    cursor: Any = "0-0"
    while True:
        # Redis 6.2 answers [cursor, entries]; 7 adds the ids of deleted entries.
        answer: Any = await redis.xautoclaim(
            stream, keys.QUEUE_GROUP, consumer, 0, cursor, count=500
        )
        cursor = answer[0]
        backlog += queue.parse_entries(answer[1])
        if cursor in (b"0-0", "0-0"):
            break
    in_flight: set[asyncio.Task[int]] = set()
    # Requests begun and not yet finished: a batch's stragglers (slow charges) count as what
    # they are, not as a whole batch, so they hold up no later batch on their own.
    unfinished = Unfinished()
    most = app.settings.queue_in_flight * BATCH
    lost = asyncio.Event()
    keeper = asyncio.create_task(_keep_lease(app, lease, consumer, lost))
    try:
        while not lost.is_set():
            if backlog:
                batch, backlog = backlog[:BATCH], backlog[BATCH:]
            else:
                read: Any = await redis.xreadgroup(
                    keys.QUEUE_GROUP, consumer, {stream: ">"}, count=BATCH
                )
                batch = queue.parse_entries(read[0][1]) if read else []
            if not batch:
                if not in_flight:
                    break
                # Earlier batches still pay: look for new requests again in a moment.
                ready, _ = await asyncio.wait(
                    in_flight, timeout=LOOK_AGAIN, return_when=asyncio.FIRST_COMPLETED
                )
                for finished in ready:
                    in_flight.discard(finished)
                    done += await _finished(finished)
                continue
            app.pacer.busy()
            rest = await begin(app, batch)
            unfinished.count += len(batch)
            in_flight.add(
                asyncio.create_task(_complete(app, event_id, batch, rest, announce, unfinished))
            )
            while unfinished.count > most or any(t.done() for t in in_flight):
                # Too much in hand: wait for a batch, or a wave of one, to finish.
                ready, _ = await asyncio.wait(
                    in_flight, timeout=LOOK_AGAIN, return_when=asyncio.FIRST_COMPLETED
                )
                for finished in ready:
                    in_flight.discard(finished)
                    done += await _finished(finished)
            if stop is not None and stop.is_set():
                break  # shutting down: what is left stays queued for another worker
        # The lease lost (someone else drains now), the queue empty, or a stop.
        while in_flight:
            done += await _first_finished(in_flight)
        return done
    finally:
        keeper.cancel()
        if in_flight:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                for batch_task in in_flight:
                    batch_task.cancel()  # stopping for good; their entries stay pending
            # Otherwise an error: the batches in hand still finish.
            await asyncio.gather(*in_flight, return_exceptions=True)


async def _keep_lease(app: State, lease: str, consumer: str, lost: asyncio.Event) -> None:
    """Renew the event's lease while its queue is drained, however long a batch takes; set
    ``lost`` if it went to someone else (this holder stalled past its expiry)."""
    every = app.settings.queue_lease_ms / 3000
    while True:
        await asyncio.sleep(every)
        try:
            renewed = await app.redis.eval(_RENEW, 1, lease, consumer, app.settings.queue_lease_ms)
        except Exception:
            log.warning("could not renew the queue lease %s", lease, exc_info=True)
            continue
        if not renewed:
            lost.set()
            return


async def _first_finished(batches: set[asyncio.Task[int]]) -> int:
    """Wait for one of the batches in hand to complete (whichever does first); how many
    requests it finished."""
    ready, _ = await asyncio.wait(batches, return_when=asyncio.FIRST_COMPLETED)
    finished = ready.pop()
    batches.discard(finished)
    return await _finished(finished)


async def _finished(batch: asyncio.Task[int]) -> int:
    """A batch's completion; one that failed leaves its entries pending for the next drain. An
    outage stops the drain (the worker backs off; the next drain takes those entries first)."""
    try:
        return await batch
    except errors.UNAVAILABLE:
        raise
    except Exception:
        log.exception("completing a booking batch failed; its requests stay queued")
        return 0


class Unfinished:
    """How many requests the batches in flight have begun and not finished."""

    def __init__(self) -> None:
        self.count = 0


async def _complete(
    app: State,
    event_id: str,
    batch: list[Entry],
    rest: Rest,
    announce: Announce,
    unfinished: Unfinished | None = None,
) -> int:
    """A batch's rest: each wave's announcements, and its entries acknowledged once their
    sagas ended. Returns how many were. ``unfinished`` counts the batch's requests (the caller
    added them) down as their waves end, and the rest when the batch stops.

    Redis out of reach for a wave's announcements does not stop the batch: its later bookings
    are still paid and finished in PostgreSQL, and the entries Redis did not hear about stay
    pending, for the next drain to acknowledge; the outage is raised once the batch is done."""
    settled = done = 0
    outage: BaseException | None = None
    try:
        async for wave in rest():
            settled += len(wave)
            if unfinished is not None:
                unfinished.count -= len(wave)
            entries = [entry for entry, _ in wave]
            outcomes = [outcome for _, outcome in wave]
            # Done with an entry: its saga ended, someone else runs it, or it stood for an
            # earlier booking (same Idempotency-Key) that has a saga of its own.
            finished = [
                entry.entry_id
                for entry, outcome in wave
                if outcome is None
                or outcome.state in ("CONFIRMED", "FAILED", "CANCELLED")
                or outcome.booking_id != entry.request_id
            ]
            try:
                async with app.redis.pipeline(transaction=False) as pipe:
                    queue.settle_claims(pipe, entries, outcomes)
                    announce(pipe, [o for o in outcomes if o is not None])
                    if finished:
                        pipe.eval(
                            _DONE,
                            2,
                            keys.queue(event_id),
                            keys.queue_served(event_id),
                            keys.QUEUE_GROUP,
                            *finished,
                        )
                    await pipe.execute()
            except errors.UNAVAILABLE as exc:
                outage = exc
                continue
            done += len(finished)
        if outage is not None:
            raise outage
        return done
    finally:
        if unfinished is not None:
            unfinished.count -= len(batch) - settled


def worker(app: State, begin: Begin, announce: Announce) -> Worker:
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
                    finished = await drain(app, event_id, consumer, begin, announce, stop)
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
