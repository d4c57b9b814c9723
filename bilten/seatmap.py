"""Seat maps and event details, served from caches.

A seat map is encoded once per version: the bytes live in this process (checked against the
event's current version, one indexed lookup shared by the requests of one loop turn) and in
Redis under a key naming the version, so another instance never re-encodes what one has built.
Event details are cached in-process only and dropped on change (see :mod:`bilten.cache`). Both
keep their response headers beside the body, made once.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgspec

from bilten import events, keys, metrics, wire
from bilten.batching import Batcher
from bilten.db import Connection, Pool
from bilten.state import State

SeatStatus = Literal["available", "held", "sold"]
REDIS_TTL = 120  # a busy event makes a new map every moment: keep only the recent ones


class Seat(msgspec.Struct, kw_only=True):
    id: str
    section: str
    row: str
    number: int
    label: str
    x: float
    y: float
    tier: str
    price_cents: int
    status: SeatStatus
    version: int  # of this seat's last change: apply a delta's change only if it is newer


class SeatMap(msgspec.Struct, kw_only=True):
    event_id: str
    version: int
    seats: list[Seat]


_encoder = msgspec.json.Encoder()

# An expired hold is available at once in a freshly built map; a map built before the expiry
# shows the seat held until the sweeper releases it (within a second or so).
SEAT_STATUS = """CASE WHEN es.status = 'held' AND es.hold_expires_at <= now() THEN 'available'
                      ELSE es.status END"""

# ``version`` is the greatest seat version (what deltas are compared with: the statement triggers
# on event_seats record it, migration 0015); ``commits`` rises with every committed change even
# when changes commit out of version order (see migration 0010), so the pair identifies the
# map's content: it keys the caches and makes the ETag.
_HEADS = """SELECT e.id::text AS id, e.status, e.organizer_id::text AS organizer_id,
                   coalesce((SELECT max(version) FROM seat_map_commits
                             WHERE event_id = e.id), 0) AS version,
                   coalesce((SELECT sum(weight) FROM seat_map_commits
                             WHERE event_id = e.id), 0)::bigint AS commits
            FROM events e WHERE e.id = ANY($1::uuid[])"""


@dataclass(frozen=True)
class Encoded:
    version: int
    commits: int
    body: bytes
    status: str
    organizer_id: str

    @property
    def tag(self) -> str:
        return f"{self.version}.{self.commits}"

    @property
    def etag(self) -> str:
        return f'"{self.tag}"'

    @functools.cached_property
    def tag_headers(self) -> wire.RawHeaders:
        """Of a 304 as well as a 200; clients must ask again (with If-None-Match) every time."""
        return [(b"etag", self.etag.encode()), (b"cache-control", b"no-cache")]

    @functools.cached_property
    def headers(self) -> wire.RawHeaders:
        return [*wire.body_headers(self.body), *self.tag_headers]


class Heads(Batcher[str, Any]):
    """The heads of the seat maps asked for in one turn of the event loop, read in one statement.

    Every request reads its map's head (version, commits, status) after it came, so a change
    committed before it is always seen; the requests of one turn share that read instead of
    each taking a pooled connection and a round trip of its own.
    """

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool

    async def handle(self, calls: list[str]) -> list[Any]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_HEADS, list(set(calls)))
        found = {row["id"]: row for row in rows}
        return [found.get(event_id) for event_id in calls]


async def _build(conn: Connection, event_id: str) -> Encoded | None:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        heads = await conn.fetch(_HEADS, [event_id])
        if not heads:
            return None
        rows = await conn.fetch(
            f"""SELECT s.id::text AS id, sec.name AS section, s.row_label AS row, s.number,
                       s.label, s.x, s.y, t.name AS tier, t.price_cents, {SEAT_STATUS} AS status,
                       es.version
                FROM event_seats es
                JOIN seats s ON s.id = es.seat_id
                JOIN sections sec ON sec.id = s.section_id
                JOIN price_tiers t ON t.id = es.tier_id
                WHERE es.event_id = $1
                ORDER BY sec.position, s.row_index, s.number""",
            event_id,
        )
    head = heads[0]
    seat_map = SeatMap(
        event_id=event_id, version=head["version"], seats=[Seat(**dict(r)) for r in rows]
    )
    return Encoded(
        head["version"],
        head["commits"],
        _encoder.encode(seat_map),
        head["status"],
        head["organizer_id"],
    )


async def seat_map(app: State, event_id: str) -> Encoded | None:
    """The event's encoded seat map at its current version; None when there is no such event.
    ``event_id`` is a UUID in its canonical text form."""
    heads = app.caches.seat_heads
    assert heads is not None, "the app gives its caches a Heads (cache.Caches(seat_heads=...))"
    head = await heads.call(event_id)
    if head is None:
        return None
    tag = f"{head['version']}.{head['commits']}"
    cached: Encoded | None = app.caches.seat_maps.get(event_id)
    if cached is not None and cached.tag == tag:
        return cached
    # The requests that find the same new version share one load: while a sale changes the map
    # every moment, a crowd of browsers asking at once costs one build, not one each.
    loading = app.caches.seat_maps.loading
    key = f"{event_id} {tag}"
    running = loading.get(key)
    if running is None:
        running = loading[key] = asyncio.ensure_future(_load(app, event_id, head, tag))
        running.add_done_callback(lambda done: app.caches.seat_maps.forget_load(key, done))
    found: Encoded | None = await asyncio.shield(running)
    return found


async def _load(app: State, event_id: str, head: Any, tag: str) -> Encoded | None:
    """The map of ``tag`` from Redis (another instance built it), else built here (at least as
    new as ``tag``) and shared there; kept in this process's cache."""
    shared = cast(bytes | None, await app.redis.get(keys.seat_map(event_id, tag)))
    if shared is not None:
        found = Encoded(
            head["version"], head["commits"], shared, head["status"], head["organizer_id"]
        )
    else:
        async with app.db.acquire() as conn:
            built = await _build(conn, event_id)
        if built is None:
            return None
        metrics.SEAT_MAP_BUILDS.inc()
        found = built
        await app.redis.set(keys.seat_map(event_id, found.tag), found.body, ex=REDIS_TTL)
    kept: Encoded | None = app.caches.seat_maps.get(event_id)
    if kept is None or (kept.version, kept.commits) <= (found.version, found.commits):
        app.caches.seat_maps.put(event_id, found)  # a slower load of an older one keeps out
    return found


@dataclass(frozen=True)
class Detail:
    body: bytes
    status: str
    organizer_id: str
    units_left: dict[str, int]  # ticket type id: remaining (capacity - sold - held)

    @functools.cached_property
    def headers(self) -> wire.RawHeaders:
        return wire.body_headers(self.body)


async def detail(app: State, event_id: str) -> Detail | None:
    """The encoded event detail, from this process's cache when it has a fresh copy; the
    requests that find none at the same moment share one load."""
    cached: Detail | None = app.caches.details.get(event_id)
    if cached is not None:
        return cached
    found: Detail | None = await app.caches.details.get_or_load(
        event_id, lambda: _load_detail(app, event_id)
    )
    return found


async def _load_detail(app: State, event_id: str) -> Detail | None:
    token = app.caches.details.token(event_id)
    async with app.db.acquire() as conn:
        event = await events.get(conn, event_id)
    if event is None:
        return None
    found = Detail(
        _encoder.encode(event),
        event.status,
        event.organizer_id,
        {t.id: t.remaining for t in event.ticket_types},
    )
    app.caches.details.put(event_id, found, token)
    return found
