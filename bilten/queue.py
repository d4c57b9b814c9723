"""The booking queue: one Redis stream per event, filled by the door, drained by workers.

The booking worker (``bilten.workers.bookings``) consumes them as one consumer group.
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

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from bilten import claimnews, holds, keys, metrics
from bilten.errors import ApiError
from bilten.pipelining import AutoPipeline

log = logging.getLogger(__name__)

CLAIM_TTL_MS = 180_000  # a queued request's seats: longer than its wait plus its payment
SOLD_TTL_MS = 600_000  # a sold seat: refused at the door for 10 minutes, then by the database
# What the worker last found left of a ticket type when it could not cover a request: for this
# long the door refuses requests for more (409 sold_out) instead of queueing them to fail.
UNITS_LEFT_TTL_MS = 3_000

# KEYS (all in the event's slot): idempotency key, seat claims, ticket, served, stream, request
# status, units left. ARGV: request id, event id, maximum, user id, body hash, request (JSON),
# now (unix ms), claim ttl (ms), the user's channel, ticket type id ('' for seats), quantity,
# units left as the caller's catalog cache has them (-1: not known), the event's seats channel
# (told the claimed seats: bilten.claimnews), seat ids...
# Returns {'known', "<request id> <body hash>"}, {'sold_out', units left}, {'full', depth},
# {'taken', {seat ids}} or {'queued', position, depth}. The active-events set is another slot's:
# the caller adds the event to it once the request is queued.
_SUBMIT = """
local known = redis.call('GET', KEYS[1])
if known then return {'known', known} end
local now = tonumber(ARGV[7])
if ARGV[10] ~= '' then
  local cached = tonumber(ARGV[12])
  if cached >= 0 and tonumber(ARGV[11]) > cached then return {'sold_out', cached} end
  local left = redis.call('HGET', KEYS[7], ARGV[10])
  if left then
    local n, untl = string.match(left, '(%d+) (%d+)')
    if tonumber(untl) > now and tonumber(ARGV[11]) > tonumber(n) then
      return {'sold_out', tonumber(n)}
    end
  end
end
local served = tonumber(redis.call('GET', KEYS[4]) or '0')
local waiting = tonumber(redis.call('GET', KEYS[3]) or '0') - served
if waiting >= tonumber(ARGV[3]) then return {'full', waiting} end
local taken = {}
for i = 14, #ARGV do
  local claimed = redis.call('HGET', KEYS[2], ARGV[i])
  if claimed and tonumber(claimed) > now then taken[#taken + 1] = ARGV[i] end
end
if #taken > 0 then return {'taken', taken} end
if #ARGV >= 14 then
  local expiry = now + tonumber(ARGV[8])
  for i = 14, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], expiry) end
  redis.call('EXPIRE', KEYS[2], 86400)
  redis.call('PUBLISH', ARGV[13], '{"type":"seats.claimed","event_id":"' .. ARGV[2] ..
      '","seat_ids":["' .. table.concat(ARGV, '","', 14) .. '"]}')
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[5], 'EX', 86400)
local ticket = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[5], '*', 'id', ARGV[1], 'r', ARGV[6])
redis.call('HSET', KEYS[6], 'status', 'queued', 'event_id', ARGV[2], 'ticket', ticket,
           'user_id', ARGV[4])
redis.call('EXPIRE', KEYS[6], 86400)
local position = ticket - served
redis.call('PUBLISH', ARGV[9], '{"type":"queue.position","request_id":"' .. ARGV[1] ..
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
    request: Request, maximum: int, units_left: int = -1
) -> tuple[tuple[str, ...], tuple[str | int | bytes, ...]]:
    """The KEYS and ARGV of :data:`_SUBMIT` and :data:`_RESTORE` for ``request``."""
    seat_ids: list[str] = request.request.get("seat_ids") or []
    names = (
        keys.idempotency(request.event_id, request.user_id, request.key),
        keys.seat_claims(request.event_id),
        keys.queue_ticket(request.event_id),
        keys.queue_served(request.event_id),
        keys.queue(request.event_id),
        keys.booking_request(request.id),
        keys.units_left(request.event_id),
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
        keys.user_channel(request.user_id),
        request.request.get("ticket_type_id") or "",
        int(request.request.get("quantity") or 0),
        units_left,
        keys.seats_channel(request.event_id),
        *seat_ids,
    )
    return names, args


def new_request_id(event_id: str) -> str:
    """A random id (a UUID, as it becomes the booking's id) that begins with its event's tag,
    so that :func:`bilten.keys.booking_request` finds the request's status in the event's slot
    from the id alone."""
    random = bytearray(os.urandom(16))
    random[6] = random[6] & 0x0F | 0x40  # version 4
    random[8] = random[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = keys.event_tag(event_id) + random.hex()[keys.TAG_LENGTH :]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


async def submit(
    redis: AutoPipeline, request: Request, maximum: int, units_left: int = -1
) -> int | Known:
    """Queue a request in one atomic step; returns its position (1 = next).

    Unless its Idempotency-Key was used before (:class:`Known`), the request is refused with
    409 ``seat_unavailable`` when a seat it wants is claimed (another queued request wants it,
    or it was sold), with 409 ``sold_out`` when it wants more units of a ticket type than
    ``units_left`` (what the caller's catalog cache has left; -1 when it does not know) or
    than the event's worker found left a moment ago (:data:`UNITS_LEFT_TTL_MS`), and with 503
    when the queue is full; a refused request leaves nothing behind. Otherwise its seats are
    claimed, its key remembered and its status set. Claims and units left are a pre-check that
    keeps doomed requests out of the queue; the database still decides.
    """
    names, args = _script_args(request, maximum, units_left)
    answer: Any = await redis.script(_SUBMIT, _SUBMIT_SHA, names, args)
    kind = answer[0].decode()
    if kind == "queued":
        # After the entry, never before it: a worker that found the stream empty takes the
        # event out of the set and then looks at the stream again (bilten.workers.bookings).
        await redis.command_once("SADD", keys.QUEUE_ACTIVE, request.event_id)
    if kind == "known":
        request_id, _, digest = answer[1].decode().partition(" ")
        return Known(request_id, digest)
    if kind == "taken":
        raise holds.seat_unavailable([s.decode() for s in answer[1]])
    if kind == "sold_out":
        type_id = str(request.request.get("ticket_type_id"))
        raise ApiError(
            "sold_out",
            f"Only {answer[1]} left of this ticket type.",
            {"ticket_type_id": type_id, "remaining": answer[1]},
        )
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
# status. KEYS and ARGV as for _SUBMIT, less the maximum, the time check and the publish.
_RESTORE = """
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[5], 'EX', 86400, 'NX')
if #ARGV >= 14 then
  local expiry = tonumber(ARGV[7]) + tonumber(ARGV[8])
  for i = 14, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], expiry) end
  redis.call('EXPIRE', KEYS[2], 86400)
end
local ticket = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[5], '*', 'id', ARGV[1], 'r', ARGV[6])
redis.call('HSET', KEYS[6], 'status', 'queued', 'event_id', ARGV[2], 'ticket', ticket,
           'user_id', ARGV[4])
redis.call('EXPIRE', KEYS[6], 86400)
return ticket
"""


async def restore(redis: Redis, request: Request) -> None:
    """Queue again a request that Redis lost (see :mod:`bilten.intake`)."""
    names, args = _script_args(request, 0)
    await redis.eval(_RESTORE, len(names), *names, *args)
    await redis.sadd(keys.QUEUE_ACTIVE, request.event_id)


def settle_claims(pipe: Pipeline, entries: list[Entry], outcomes: list[Any]) -> None:
    """After a batch, on the caller's pipeline: a failed request's seats are free to claim
    again (its event's room is told: ``seats.released``, :mod:`bilten.claimnews`), a sold seat
    stays claimed for :data:`SOLD_TTL_MS`; what was left of a ticket type that could not cover a
    request is told to the door for :data:`UNITS_LEFT_TTL_MS`, unless units of that type came
    back in the batch."""
    sold: dict[str, list[str]] = {}
    freed: dict[str, list[str]] = {}
    units_left: dict[tuple[str, str], int] = {}
    units_back: set[tuple[str, str]] = set()
    for entry, outcome in zip(entries, outcomes, strict=True):
        if outcome is None or entry.request is None:
            continue
        type_id = entry.request.request.get("ticket_type_id")
        if type_id and outcome.state in ("FAILED", "CANCELLED"):
            kind = (entry.request.event_id, type_id)
            error = outcome.error
            if error is not None and error.code == "sold_out":
                left = int((error.details or {}).get("remaining", 0))
                units_left[kind] = min(left, units_left.get(kind, left))
            else:
                units_back.add(kind)
        seat_ids = entry.request.request.get("seat_ids")
        if not seat_ids:
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
        claimnews.released(pipe, event_id, seats)
    until = int(time.time() * 1000) + UNITS_LEFT_TTL_MS
    for (event_id, type_id), left in units_left.items():
        if (event_id, type_id) not in units_back:
            pipe.hset(keys.units_left(event_id), type_id, f"{left} {until}")
            pipe.pexpire(keys.units_left(event_id), UNITS_LEFT_TTL_MS)
    for event_id, type_id in units_back:
        pipe.hdel(keys.units_left(event_id), type_id)


async def release_claims(redis: Redis, event_id: str, seat_ids: list[str]) -> None:
    """Seats given back (a cancelled booking): new requests for them queue again at once."""
    if seat_ids:
        await redis.hdel(keys.seat_claims(event_id), *seat_ids)


async def position(redis: AutoPipeline, event_id: str, ticket: int) -> int:
    """A queued request's place (1 = next), read with the other reads of this loop turn."""
    served = await redis.command("GET", keys.queue_served(event_id))
    return max(0, ticket - int(served or 0))


async def ensure_group(redis: Redis, stream: str) -> None:
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
