"""The booking queue: one Redis stream per event, drained by workers on every instance.

All instances form one consumer group. A worker takes an event by a lease (a key with an
expiry that it renews), so one event's requests are processed in arrival order, while other
events proceed on other workers. Entries are acknowledged only when their saga has ended. A new
lease holder first claims whatever the previous holder left pending (``XAUTOCLAIM``): a dead
instance loses nothing, and the sagas' own state checks make a second run harmless.
Positions are counters: ``ticket`` (enqueued) minus ``served`` (finished). On enqueue the
owner's channel gets the position and the ticket; afterwards each instance broadcasts the
event's ``served`` counter to its room when it moves, and clients work out their own position.

A request travels whole in its entry: the worker makes the booking rows of a batch in one
statement (the saga's first step), so ``POST /bookings`` itself touches only Redis. Its
Idempotency-Key is remembered in Redis for a day (the database's unique index stays the last
guard), and the seats it asks for are claimed there, so a request for a seat that another
queued request wants, or that was sold, is refused at once instead of queueing to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from bilten import holds, keys, metrics
from bilten.errors import ApiError
from bilten.pipelining import AutoPipeline
from bilten.state import State
from bilten.supervisor import Worker

log = logging.getLogger(__name__)

# A batch's first step (bookings made, seats reserved), returning the rest (payments, finish).
Begin = Callable[[State, list["Entry"]], Awaitable[Callable[[], Awaitable[list[Any]]]]]
# Queues the outcomes' announcements (statuses, wake-ups) on a pipeline.
Announce = Callable[[Pipeline, list[Any]], None]

BATCH = 200
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


CLAIM_TTL_MS = 180_000  # a queued request's seats: longer than its wait plus its payment
SOLD_TTL_MS = 600_000  # a sold seat: refused at the door for 10 minutes, then by the database

# KEYS: idempotency key, seat claims, ticket, served, stream, active set, request status, user
# channel. ARGV: request id, event id, maximum, user id, body hash, request (JSON), now (unix ms),
# claim ttl (ms), seat ids...
# Returns {'known', "<request id> <body hash>"}, {'full', depth}, {'taken', {seat ids}} or
# {'queued', position, depth}.
_SUBMIT = """
local known = redis.call('GET', KEYS[1])
if known then return {'known', known} end
local served = tonumber(redis.call('GET', KEYS[4]) or '0')
local waiting = tonumber(redis.call('GET', KEYS[3]) or '0') - served
if waiting >= tonumber(ARGV[3]) then return {'full', waiting} end
local now = tonumber(ARGV[7])
local taken = {}
for i = 9, #ARGV do
  local claimed = redis.call('HGET', KEYS[2], ARGV[i])
  if claimed and tonumber(claimed) > now then taken[#taken + 1] = ARGV[i] end
end
if #taken > 0 then return {'taken', taken} end
if #ARGV >= 9 then
  local expiry = now + tonumber(ARGV[8])
  for i = 9, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], expiry) end
  redis.call('EXPIRE', KEYS[2], 86400)
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[5], 'EX', 86400)
local ticket = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[5], '*', 'id', ARGV[1], 'r', ARGV[6])
redis.call('SADD', KEYS[6], ARGV[2])
redis.call('HSET', KEYS[7], 'status', 'queued', 'event_id', ARGV[2], 'ticket', ticket,
           'user_id', ARGV[4])
redis.call('EXPIRE', KEYS[7], 86400)
local position = ticket - served
redis.call('PUBLISH', KEYS[8], '{"type":"queue.position","request_id":"' .. ARGV[1] ..
    '","event_id":"' .. ARGV[2] .. '","position":' .. position .. ',"ticket":' .. ticket .. '}')
return {'queued', position, waiting + 1}
"""


_SUBMIT_SHA = hashlib.sha1(_SUBMIT.encode()).hexdigest()


class Request(msgspec.Struct, kw_only=True):
    """A booking request as it waits in the queue; the worker makes the booking row from it."""

    id: str
    user_id: str
    event_id: str
    key: str
    digest: str
    request: dict[str, Any]
    provider: str
    token: str


@dataclass(frozen=True)
class Entry:
    """One stream entry: a request, or (written before requests travelled whole) only its id."""

    entry_id: bytes
    request_id: str
    request: Request | None


class Known(NamedTuple):
    """The Idempotency-Key was used before: the request it was used for, and that body's hash."""

    request_id: str
    digest: str


_decode_request = msgspec.json.Decoder(Request).decode
_encode = msgspec.json.Encoder().encode


def encode_request(request: Request) -> bytes:
    return _encode(request)


def decode_request(raw: bytes) -> Request:
    return _decode_request(raw)


def _script_args(
    request: Request, maximum: int
) -> tuple[tuple[str, ...], tuple[str | int | bytes, ...]]:
    """The KEYS and ARGV of :data:`_SUBMIT` and :data:`_RESTORE` for ``request``."""
    seat_ids: list[str] = request.request.get("seat_ids") or []
    names = (
        keys.idempotency(request.user_id, request.key),
        keys.seat_claims(request.event_id),
        keys.queue_ticket(request.event_id),
        keys.queue_served(request.event_id),
        keys.queue(request.event_id),
        keys.QUEUE_ACTIVE,
        keys.booking_request(request.id),
        keys.user_channel(request.user_id),
    )
    args: tuple[str | int | bytes, ...] = (
        request.id,
        request.event_id,
        maximum,
        request.user_id,
        request.digest,
        _encode(request),
        int(time.time() * 1000),
        CLAIM_TTL_MS,
        *seat_ids,
    )
    return names, args


async def submit(redis: AutoPipeline, request: Request, maximum: int) -> int | Known:
    """Queue a request in one atomic step; returns its position (1 = next).

    Unless its Idempotency-Key was used before (:class:`Known`), the request is refused with
    409 ``seat_unavailable`` when a seat it wants is claimed (another queued request wants it,
    or it was sold), and with 503 when the queue is full; a refused request leaves nothing
    behind. Otherwise its seats are claimed, its key remembered and its status set. Claims are a
    pre-check that keeps doomed requests out of the queue; the database still decides.
    """
    names, args = _script_args(request, maximum)
    answer: Any = await redis.script(_SUBMIT, _SUBMIT_SHA, names, args)
    kind = answer[0].decode()
    if kind == "known":
        request_id, _, digest = answer[1].decode().partition(" ")
        return Known(request_id, digest)
    if kind == "taken":
        raise holds.seat_unavailable([s.decode() for s in answer[1]])
    metrics.QUEUE_DEPTH.set(answer[-1])
    if kind == "full":
        raise ApiError(
            "unavailable",
            "The booking queue for this event is full; try again shortly.",
            {"queue_depth": answer[1]},
            headers={"Retry-After": "2"},
        )
    return int(answer[1])


# A request PostgreSQL has on record and Redis lost, queued again as it was accepted: its key
# (unless taken again meanwhile), its claims (unchecked: the database decides), its entry and
# status. KEYS and ARGV as for _SUBMIT, less the maximum and the time check.
_RESTORE = """
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[5], 'EX', 86400, 'NX')
if #ARGV >= 9 then
  local expiry = tonumber(ARGV[7]) + tonumber(ARGV[8])
  for i = 9, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], expiry) end
  redis.call('EXPIRE', KEYS[2], 86400)
end
local ticket = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[5], '*', 'id', ARGV[1], 'r', ARGV[6])
redis.call('SADD', KEYS[6], ARGV[2])
redis.call('HSET', KEYS[7], 'status', 'queued', 'event_id', ARGV[2], 'ticket', ticket,
           'user_id', ARGV[4])
redis.call('EXPIRE', KEYS[7], 86400)
return ticket
"""


async def restore(redis: Redis, request: Request) -> None:
    """Queue again a request that Redis lost (see :mod:`bilten.intake`)."""
    names, args = _script_args(request, 0)
    await redis.eval(_RESTORE, len(names), *names, *args)


def settle_claims(pipe: Pipeline, entries: list[Entry], outcomes: list[Any]) -> None:
    """After a batch, on the caller's pipeline: a failed request's seats are free to claim
    again, a sold seat stays claimed for :data:`SOLD_TTL_MS`."""
    sold: dict[str, list[str]] = {}
    freed: dict[str, list[str]] = {}
    for entry, outcome in zip(entries, outcomes, strict=True):
        seat_ids = entry.request.request.get("seat_ids") if entry.request else None
        if not seat_ids or outcome is None or entry.request is None:
            continue
        if outcome.state == "CONFIRMED":
            sold.setdefault(entry.request.event_id, []).extend(seat_ids)
        elif outcome.state in ("FAILED", "CANCELLED"):
            freed.setdefault(entry.request.event_id, []).extend(seat_ids)
    until = int(time.time() * 1000) + SOLD_TTL_MS
    for event_id, seats in sold.items():
        pipe.hset(keys.seat_claims(event_id), mapping=dict.fromkeys(seats, until))
    for event_id, seats in freed.items():
        pipe.hdel(keys.seat_claims(event_id), *seats)


async def release_claims(redis: Redis, event_id: str, seat_ids: list[str]) -> None:
    """Seats given back (a cancelled booking): new requests for them queue again at once."""
    if seat_ids:
        await redis.hdel(keys.seat_claims(event_id), *seat_ids)


async def position(redis: Redis, event_id: str, ticket: int) -> int:
    served = await redis.get(keys.queue_served(event_id))
    return max(0, ticket - int(served or 0))


async def _ensure_group(redis: Redis, stream: str) -> None:
    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
        await redis.xgroup_create(stream, keys.QUEUE_GROUP, id="0", mkstream=True)


def parse_entries(raw: Any) -> list[Entry]:
    """Entries as XREADGROUP, XAUTOCLAIM or XRANGE return them."""
    return [
        Entry(
            entry_id,
            fields[b"id"].decode(),
            _decode_request(fields[b"r"]) if b"r" in fields else None,
        )
        for entry_id, fields in raw
        if fields
    ]


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

    Two batches overlap: while one pays and finishes, the next one's seats are reserved. It is
    reserved only after the one before committed its reservations, so what is free goes to
    requests in arrival order (what the earlier batch's failed payments give back comes free
    only after that).
    """
    redis = app.redis
    stream = keys.queue(event_id)
    lease = keys.queue_lease(event_id)
    await _ensure_group(redis, stream)
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
        backlog += parse_entries(answer[1])
        if cursor in (b"0-0", "0-0"):
            break
    in_flight: asyncio.Task[int] | None = None
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
                batch = parse_entries(read[0][1]) if read else []
            if not batch:
                if in_flight is None:
                    break
                done += await _finished(in_flight)  # new requests may come while it finishes
                in_flight = None
                continue
            rest = await begin(app, batch)
            if in_flight is not None:
                done += await _finished(in_flight)
            in_flight = asyncio.create_task(_complete(app, event_id, batch, rest, announce))
            if stop is not None and stop.is_set():
                break  # shutting down: what is left stays queued for another worker
        # The lease lost (someone else drains now), the queue empty, or a stop.
        if in_flight is not None:
            done += await _finished(in_flight)
            in_flight = None
        return done
    finally:
        keeper.cancel()
        if in_flight is not None and not in_flight.done():
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                in_flight.cancel()  # stopping for good; its entries stay pending
            # Otherwise an error: the batch in hand still finishes.
            with contextlib.suppress(BaseException):
                await in_flight


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


async def _finished(batch: asyncio.Task[int]) -> int:
    """A batch's completion; one that failed leaves its entries pending for the next drain."""
    try:
        return await batch
    except Exception:
        log.exception("completing a booking batch failed; its requests stay queued")
        return 0


async def _complete(
    app: State,
    event_id: str,
    batch: list[Entry],
    rest: Callable[[], Awaitable[list[Any]]],
    announce: Announce,
) -> int:
    """A batch's rest, then its announcements; its entries are acknowledged once their sagas
    ended. Returns how many were."""
    outcomes = await rest()
    # Done with an entry: its saga ended, someone else runs it, or it stood for an earlier
    # booking (same Idempotency-Key) that has a saga of its own.
    finished = [
        entry.entry_id
        for entry, outcome in zip(batch, outcomes, strict=True)
        if outcome is None
        or outcome.state in ("CONFIRMED", "FAILED", "CANCELLED")
        or outcome.booking_id != entry.request_id
    ]
    async with app.redis.pipeline(transaction=False) as pipe:
        settle_claims(pipe, batch, outcomes)
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
    return len(finished)


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
