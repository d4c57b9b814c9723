"""The transactional outbox: state changes recorded in the same transaction as the change, and
a relay that publishes them to Redis afterwards, in order, at least once.

Topics: ``seats`` (a seat-map delta for an event's room), ``user`` (a message for one user's
channel: booking results, payment status), ``users`` (the messages of a batch's bookings in one
row, a list of ``user`` payloads: one row a batch instead of one a booking), ``catalog`` (an
event whose cached details are stale). Consumers must tolerate redelivery.

The relay is woken by PostgreSQL's ``LISTEN/NOTIFY``, and the table stays the record: a lost
notification delays a row (to the next slow poll, or the drain after a reconnect), never loses
it. Writers do not notify in every transaction: PostgreSQL queues notifications under one lock
held until the commit is flushed, so commits that notify are serialised (measured: 8 writers
fell from ~1,670 to ~670 commits/s). A statement-level trigger (migration 0014) notifies only
while the relay waits, which the relay tells by holding :data:`IDLE_LOCK`:

* a writer's insert takes that lock *shared* until it commits, or, when it cannot because the
  relay holds it, notifies (delivered at the writer's commit);
* the relay takes it only with ``pg_try_advisory_lock``, which fails while a writer between its
  insert and its commit shares it: the relay then looks again in a moment. Once it has the lock,
  every writer that shared it has committed (locks go after a commit is visible), so a last look
  at the table sees their rows, and every later writer notifies.

So an idle relay is woken at the commit, a busy one polls every ``interval`` and gathers what
came meanwhile into one pass, and the seat deltas of one event in one pass are published as
one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from bilten import db, keys, pubsub
from bilten.db import Connection

log = logging.getLogger(__name__)

CHANNEL = "bilten_outbox"  # what the trigger notifies and the relay listens on
RELAY_LOCK = 0x6F7574626F78  # "outbox": held by the one relaying connection; keeps the order
IDLE_LOCK = 0x6F6269646C65  # "obidle": held while the relay waits (the literal in 0014)
BATCH = 500
MERGE_MAX = 1000  # seat changes in one combined delta
APPLICATION_NAME = "bilten outbox relay"  # of its connection in pg_stat_activity
_encoder = msgspec.json.Encoder()


Row = tuple[str, Any]  # topic, payload (an object; for ``users`` a list of them)


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


class _Delta:
    """The seat changes of one event gathered from several rows: one message, with each seat's
    latest change and the greatest version (what a single transaction making them all would
    have written). A seat's changes come in the order of their versions: a later change of a
    seat waits for the lock of the earlier one, whose row has the smaller id."""

    __slots__ = ("event_id", "seats", "version")

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id
        self.version = 0
        self.seats: dict[str, dict[str, Any]] = {}

    def add(self, payload: dict[str, Any]) -> None:
        self.version = max(self.version, payload["version"])
        for change in payload["changes"]:
            seat = change["seat_id"]
            known = self.seats.get(seat)
            if known is None or change["version"] >= known["version"]:
                self.seats[seat] = change

    def message(self) -> dict[str, Any]:
        return {
            "type": "seats",
            "event_id": self.event_id,
            "version": self.version,
            "changes": list(self.seats.values()),
        }


def messages_of(rows: Sequence[Row]) -> list[tuple[str, bytes]]:
    """What to publish for ``rows`` (in id order), in order: ``(channel, message)`` each.

    An event's seat changes become one delta, published where its first row was (so no change
    goes out later than it would alone); then each changed event's name on the catalog channel.
    """
    planned: list[tuple[str, Any]] = []
    open_deltas: dict[str, _Delta] = {}
    changed: dict[str, None] = {}  # events whose cached details are stale, in order
    for topic, payload in rows:
        if topic == "catalog":
            changed[payload["event_id"]] = None
            continue
        if topic == "users":
            planned += [channel_for("user", note) for note in payload]
            continue
        if topic != "seats":
            planned.append(channel_for(topic, payload))
            continue
        event_id = payload["event_id"]
        changed[event_id] = None
        delta = open_deltas.get(event_id)
        if delta is None or len(delta.seats) >= MERGE_MAX:
            delta = open_deltas[event_id] = _Delta(event_id)
            planned.append((keys.seats_channel(event_id), delta))
        delta.add(payload)
    out = [
        (channel, _encoder.encode(m.message() if isinstance(m, _Delta) else m))
        for channel, m in planned
    ]
    out += [(keys.CATALOG_CHANGED, event_id.encode()) for event_id in changed]
    return out


_TAKE = """
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT $1)
RETURNING id, topic, payload
"""


async def relay_once(conn: Connection, redis: Redis, limit: int = BATCH) -> int:
    """Publish the oldest committed rows and delete them; returns how many.

    ``conn`` holds :data:`RELAY_LOCK` (one relay at a time keeps the order). The rows are
    deleted in the transaction that publishes them: a crash before its commit leaves them to
    be published again (at least once).
    """
    async with conn.transaction():
        rows = await conn.fetch(_TAKE, limit)
        if not rows:
            return 0
        rows.sort(key=lambda r: r["id"])
        async with redis.pipeline(transaction=False) as pipe:
            for channel, message in messages_of([(r["topic"], r["payload"]) for r in rows]):
                pubsub.publish(pipe, channel, message)
            await pipe.execute()
        return len(rows)


class Relay:
    """The relay worker: one dedicated connection that holds :data:`RELAY_LOCK` (instances
    without it try again every ``fallback`` seconds), LISTENs on :data:`CHANNEL` and runs the
    passes; see the module's notes for when it waits and when it polls.

    A lost connection is opened again at once (no sooner than ``retry`` after the last try),
    and the table drained as soon as the lock is held again.
    """

    def __init__(
        self,
        database_url: str,
        redis: Redis,
        *,
        interval: float = 0.01,
        fallback: float = 1.0,
        retry: float = 0.1,
    ) -> None:
        self.database_url = database_url
        self.redis = redis
        self.interval = interval  # between passes while writers are about to commit
        self.fallback = fallback  # between looks at an idle table, in case a wake-up was lost
        self.retry = retry
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()  # the supervisor's, once running
        self.pid: int | None = None  # of the connection's server process, while it is open
        self.leader = False  # holds RELAY_LOCK
        self.waiting = False  # holds IDLE_LOCK, waiting for a notification
        self.wakeups = 0  # notifications received
        self.published = 0  # rows published

    async def __call__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        forward = asyncio.ensure_future(self._forward(stop))
        try:
            while not stop.is_set():
                try:
                    conn = await db.connect(self.database_url)
                except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                    log.warning("outbox relay cannot connect: %r", exc)
                    await self._pause(self.fallback)
                    continue
                try:
                    await self._serve(conn)
                except Exception as exc:
                    if not conn.is_closed():
                        raise
                    # Rows committed meanwhile wait in the table: drained after reconnecting.
                    log.warning("outbox relay lost its connection: %r", exc)
                    await self._pause(self.retry)
                finally:
                    self.pid = None
                    self.leader = self.waiting = False
                    await _close(conn)
        finally:
            forward.cancel()

    async def _forward(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.wake.set()

    async def _pause(self, seconds: float) -> None:
        """Until ``seconds`` pass, a notification comes, the connection drops, or a stop."""
        if self.stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    def _notified(self, *_: Any) -> None:
        self.wakeups += 1
        self.wake.set()

    def _lost(self, *_: Any) -> None:
        self.wake.set()

    async def _serve(self, conn: Connection) -> None:
        self.pid = conn.get_server_pid()
        conn.add_termination_listener(self._lost)
        await conn.execute(f"SET application_name = '{APPLICATION_NAME}'")
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK):
            self.wake.clear()
            await self._pause(self.fallback)  # another instance relays
            if self.stop.is_set():
                return
        self.leader = True
        await conn.add_listener(CHANNEL, self._notified)  # before the first look at the table
        while not self.stop.is_set():
            self.wake.clear()
            published = await relay_once(conn, self.redis)
            self.published += published
            if published >= BATCH:
                continue
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", IDLE_LOCK):
                await self._pause(self.interval)  # a writer is about to commit
                continue
            try:
                # Committed before the lock was ours: seen now. Inserted after: notifies.
                if await conn.fetchval("SELECT EXISTS (SELECT FROM outbox)"):
                    continue
                self.waiting = True
                await self._pause(self.fallback)
            finally:
                self.waiting = False
                if not conn.is_closed():
                    await conn.execute("SELECT pg_advisory_unlock($1)", IDLE_LOCK)


async def _close(conn: Connection) -> None:
    """Closing the connection gives its locks back (another instance may relay then)."""
    if not conn.is_closed():
        try:
            await asyncio.wait_for(conn.close(), 5)
        except Exception:
            conn.terminate()


def relay(database_url: str, redis: Redis, **options: float) -> Relay:
    """The relay worker for the supervisor (see :class:`Relay` for ``options``)."""
    return Relay(database_url, redis, **options)
