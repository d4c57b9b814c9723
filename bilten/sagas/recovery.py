"""Housekeeping that keeps the booking invariants true when instances die or providers fail.

* expired holds are released (they already count as available; this frees the rows);
* sagas left unfinished are resumed, one instance per booking (rows are claimed with
  ``FOR UPDATE SKIP LOCKED`` and their timestamp bumped, which leases them for a while);
* failed payments whose outcome was unknown are looked up and refunded if money was taken;
* confirmed bookings of cancelled events are cancelled (and so refunded);
* accepted requests that Redis lost are queued again (see :mod:`bilten.intake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from bilten import cache, errors, holds, keys, payments, queue, refunds
from bilten.db import Pool
from bilten.sagas import booking, steps
from bilten.state import State
from bilten.supervisor import Worker

log = logging.getLogger(__name__)

INTERVAL = 1.0
STALE_PENDING = 300  # seconds: a request may wait this long in a long queue
STALE_PAYMENT = 60  # seconds at the least; see stale_payment
# Bookings of cancelled events cancelled side by side (each holds a pooled connection).
CANCELS_AT_ONCE = 8
SETTLE_EVERY = 5  # seconds between lookups of one unsettled payment
SETTLE_WINDOW = 900  # seconds after a booking failed that a lookup finding nothing is not final
LOST_AFTER = 3.0  # seconds: an accepted request this old whose Redis status is gone was lost
REDISPATCH_ROUND = 500  # accepted requests looked at per round
FORGET_WINDOW = 2000  # records of accepted requests read per statement when forgetting


async def _claim(app: State, where: str, stale: float, limit: int = 50) -> list[str]:
    rows = await app.db.fetch(
        f"""UPDATE bookings SET updated_at = now()
            WHERE id IN (SELECT id FROM bookings WHERE {where}
                           AND updated_at < now() - make_interval(secs => $1)
                         ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED)
            RETURNING id::text""",
        stale,
        limit,
    )
    return [r["id"] for r in rows]


async def sweep_holds(app: State) -> int:
    async with app.db.acquire() as conn, conn.transaction():
        changed = await holds.sweep_expired(conn)
    for event_id in changed:
        await cache.changed(app.redis, app.caches, event_id)
    return len(changed)


def stale_payment(app: State) -> float:
    """How long a booking may stay PAYMENT_PENDING before recovery takes it over: longer than
    a queue batch waits out a provider outage with all its calls, so that recovery never takes
    a booking from a worker still charging it."""
    return max(STALE_PAYMENT, steps.charging_time(app.settings) + 30)


async def resume_sagas(app: State) -> int:
    ids = await _claim(app, "saga_state = 'PENDING'", STALE_PENDING)
    # SEATS_RESERVED: written by versions before the reserve step went straight on.
    stale = stale_payment(app)
    ids += await _claim(app, "saga_state IN ('SEATS_RESERVED', 'PAYMENT_PENDING')", stale)
    for booking_id in ids:  # each alone: one that keeps failing holds up no other
        try:
            outcome = (await booking.recover(app, [booking_id]))[booking_id]
        except errors.UNAVAILABLE:
            raise
        except Exception:
            log.exception("recovering booking %s failed; it is tried again later", booking_id)
            continue
        if outcome is None:
            continue
        await booking.announce(app, outcome)
        if outcome.state == "FAILED":
            await _unclaim(app, booking_id)
    return len(ids)


async def _unclaim(app: State, booking_id: str) -> None:
    """The door's claims on a failed booking's seats: its queue entry was finished without
    them (its worker died, or left it to recovery), so they are released here."""
    row = await app.db.fetchrow(
        "SELECT event_id::text, request -> 'seat_ids' AS seat_ids FROM bookings WHERE id = $1",
        booking_id,
    )
    if row is not None and row["seat_ids"]:
        await queue.release_claims(app.redis, row["event_id"], list(row["seat_ids"]))


async def settle_payments(app: State) -> int:
    """Payments whose outcome was not known when their booking failed: looked up (the booking
    id is the provider's key), again and again for :data:`SETTLE_WINDOW` after the booking
    failed, since a provider's search may lag (Stripe's: up to a minute); a charge found is
    refunded (durable intent), one never found is settled when the window ends."""
    ids = await _claim(app, "payment_unsettled", SETTLE_EVERY)
    for booking_id in ids:
        try:
            charge = await app.payments.lookup(key=booking_id)
        except payments.ProviderUnavailable:
            continue  # next round
        if charge is not None and charge.status == "succeeded":
            await booking.refund_stray(app, booking_id, charge)
        elif charge is not None:  # refunded at the provider already
            await app.db.execute(
                """UPDATE bookings SET payment_unsettled = false, payment_status = 'refunded'
                   WHERE id = $1""",
                booking_id,
            )
        else:
            # The window runs from the booking's failure (its history step), when its payment
            # became unknown: a booking that waited long before its charge (an outage, a
            # crash) still gets the whole window for the provider's search to catch up.
            await app.db.execute(
                """UPDATE bookings SET payment_unsettled = false
                   WHERE id = $1
                     AND coalesce((jsonb_path_query_first(
                             history, '$[*] ? (@.to == "FAILED").at') #>> '{}')::timestamptz,
                           created_at) < now() - make_interval(secs => $2)""",
                booking_id,
                SETTLE_WINDOW,
            )
    return len(ids)


async def cancel_for_cancelled_events(app: State) -> int:
    # Claimed like stale sagas: a booking whose cancel fails (the database, say) waits its turn
    # again instead of being retried every second ahead of the others. Its refund is the refund
    # worker's (bilten.refunds).
    ids = await _claim(
        app,
        "saga_state = 'CONFIRMED' AND event_id IN "
        "(SELECT id FROM events WHERE status = 'cancelled')",
        1,
    )
    gate = asyncio.Semaphore(CANCELS_AT_ONCE)

    async def cancel_one(booking_id: str) -> None:
        async with gate:
            try:
                outcome = await booking.cancel(app, booking_id, by_organizer=True)
            except Exception as exc:
                log.warning("could not cancel booking %s of a cancelled event: %s", booking_id, exc)
                return
            await booking.announce(app, outcome)

    # Side by side: each waits on its refund's provider call, and an event of 20,000 bookings
    # one after another would take hours.
    await asyncio.gather(*(cancel_one(b) for b in ids))
    return len(ids)


FOLD_AFTER = 100  # seat-map commit rows of one event before they are folded into one


async def fold_seat_map_commits(app: State) -> int:
    """Fold each busy event's commit rows into one of the same weight and greatest version (the
    sum and the greatest are unchanged, and rows inserted meanwhile are not touched), keeping
    the seat-map tag cheap to read."""
    events = await app.db.fetch(
        """SELECT event_id FROM seat_map_commits GROUP BY event_id HAVING count(*) > $1""",
        FOLD_AFTER,
    )
    for row in events:
        await app.db.execute(
            """WITH gone AS (DELETE FROM seat_map_commits WHERE event_id = $1
                             RETURNING weight, version)
               INSERT INTO seat_map_commits (event_id, weight, version)
               SELECT $1, sum(weight), max(version) FROM gone HAVING count(*) > 0""",
            row["event_id"],
        )
    return len(events)


# One window of the oldest records: those whose booking ended are deleted; the window's last
# key is where the next one starts.
_FORGET = """
WITH w AS (SELECT id, accepted_at FROM accepted_requests WHERE (accepted_at, id) > ($1, $2)
           ORDER BY accepted_at, id LIMIT $3),
gone AS (DELETE FROM accepted_requests a USING bookings b
         WHERE a.id IN (SELECT id FROM w) AND b.id = a.id
           AND b.saga_state IN ('CONFIRMED', 'FAILED', 'CANCELLED')
         RETURNING 1)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM w) AS seen,
       last.accepted_at, last.id
FROM (SELECT accepted_at, id FROM w ORDER BY accepted_at DESC, id DESC LIMIT 1) last
"""


async def forget_finished(db: Pool, window: int = FORGET_WINDOW, windows: int = 5) -> int:
    """Delete the records of requests whose booking has ended, reading at most ``windows``
    windows of ``window`` records, oldest first: a long queue (100,000 requests in a headline
    sale) is not read whole every second. Requests finish in about the order they were
    accepted, so the oldest windows hold the finished ones; one still waiting (a slow payment)
    is stepped over, and the next round starts from the oldest again."""
    forgotten = 0
    after: tuple[Any, Any] = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))
    for _ in range(windows):
        row = await db.fetchrow(_FORGET, *after, window)
        if row is None:  # no record after ``after``
            break
        forgotten += row["deleted"]
        if row["seen"] < window:
            break
        after = (row["accepted_at"], row["id"])
    return forgotten


async def redispatch(
    app: State, lost_after: float = LOST_AFTER, limit: int = REDISPATCH_ROUND
) -> int:
    """Forget the records of finished requests; queue again, in arrival order, those Redis
    lost. Returns how many were queued again."""
    await forget_finished(app.db)
    async with app.db.acquire() as conn, conn.transaction():
        # Locked, so that instances running this at once queue each request once.
        rows = await conn.fetch(
            """SELECT id::text, request FROM accepted_requests
               WHERE accepted_at < now() - make_interval(secs => $1)
               ORDER BY accepted_at, id LIMIT $2 FOR UPDATE SKIP LOCKED""",
            lost_after,
            limit,
        )
        if not rows:
            return 0
        async with app.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.hmget(keys.booking_request(row["id"]), "status", "result")
            statuses: list[Any] = await pipe.execute()
        finished = [r["id"] for r, (status, result) in zip(rows, statuses, strict=True) if result]
        lost = [r for r, (status, _) in zip(rows, statuses, strict=True) if status is None]
        for row in lost:
            await queue.restore(app.redis, queue.decode_request(row["request"]))
        if finished:  # ended without a booking row (refused by the worker before it made one)
            await conn.execute(
                "DELETE FROM accepted_requests WHERE id = ANY ($1::uuid[])", finished
            )
    if lost:
        log.warning("queued %d accepted booking request(s) again: Redis had lost them", len(lost))
    return len(lost)


STEPS = (
    fold_seat_map_commits,
    sweep_holds,
    resume_sagas,
    settle_payments,
    cancel_for_cancelled_events,
    refunds.run,
    redispatch,
)


async def run_once(app: State) -> int:
    """One round of every step; a step that fails is logged and the others still run."""
    done = 0
    for step in STEPS:
        try:
            done += await step(app)
        except Exception:
            log.exception("recovery step %s failed", step.__name__)
    return done


def worker(app: State, interval: float = INTERVAL) -> Worker:
    async def run(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await run_once(app)
            except Exception:
                log.exception("recovery round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    return run
