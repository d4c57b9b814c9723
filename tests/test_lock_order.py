"""Every path that locks seats, units, holds or bookings, run at once against one event.

For RUN_SECONDS, concurrent clients of one in-process instance running every role (the API,
the booking workers, the recovery worker) mix: holds of seats and of units, deleted or left to
expire (a 5 s TTL: swept by the recovery worker, or taken over by later claims); bookings of
seats, of units and of holds, paid (``tok_visa``) and declined (``tok_chargeDeclined``);
confirmed bookings cancelled; a hold deleted while its booking runs; a hold booked just as it
expires. The event has both seats and a general-admission ticket type, and few enough of each
that the paths keep meeting on the same rows.

Then: PostgreSQL counted no deadlock in this database, no request was answered 5xx, no booking
was left unfinished, and the inventory adds up (no seat sold twice, the ticket type's counters
equal what the holds and tickets say, confirmed bookings have tickets and a payment, failed
and cancelled ones keep no seat, no unit and no money).
"""

import asyncio
import collections
import logging
import random
import time
import uuid

import pytest

from bilten import db, keys
from bilten.payments.testing import TestProvider
from tests.test_bookings import buyer, published_event
from tests.test_catalog import running

RUN_SECONDS = 10.0
HOLD_TTL = 5  # the least BILTEN_HOLD_TTL allows
USERS = 8
LOOPS_PER_USER = 3  # one user's requests overlap too (the per-user advisory lock)
EXPIRING_LOOPS = 2  # book a hold just as it runs out
ROWS, PER_ROW = 5, 10  # 50 seats
CAPACITY = 40  # general-admission units
DRAIN_SECONDS = 30.0
AT_LEAST = 3  # of each kind of operation, for the run to count

# What each operation may answer; anything else is reported.
EXPECTED = {
    "POST /holds seats": {201, 409},
    "POST /holds units": {201, 409},
    "DELETE /holds": {204, 404},
    "POST /bookings seats": {201, 202, 402, 409},
    "POST /bookings units": {201, 202, 402, 409},
    "POST /bookings hold": {201, 202, 402, 404, 409, 410},
    "POST /bookings/{id}/cancel": {200},
}


@pytest.fixture
def settings(settings):
    return settings.replace(
        hold_ttl=HOLD_TTL,
        db_pool_max=12,  # enough connections for the paths to overlap in the database
        test_payment_latency_ms=20,  # a batch pays while the next one reserves
    )


async def deadlock_count(database_url):
    conn = await db.connect(database_url)
    try:
        return await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()


class Load:
    def __init__(self, c, event_id, seats, standing):
        self.c = c
        self.event_id = event_id
        self.seats = seats
        self.standing = standing
        self.deadline = 0.0
        self.counts = collections.Counter()
        self.server_errors = []
        self.unexpected = []
        self.to_cancel = []  # (owner's headers, booking id)
        self.refused = set()  # tasks whose last request was refused (409): they back off

    def note(self, op, response):
        self.counts[(op, response.status_code)] += 1
        if response.status_code == 409:
            self.refused.add(asyncio.current_task())
        if response.status_code >= 500:
            self.server_errors.append((op, response.status_code, response.text[:300]))
        elif response.status_code not in EXPECTED[op]:
            self.unexpected.append((op, response.status_code, response.text[:300]))

    def running(self):
        return time.monotonic() < self.deadline

    def what(self):
        """Some seats (1 to 4, often overlapping other requests), or some units."""
        if random.random() < 0.55:
            return "seats", {"seat_ids": random.sample(self.seats, random.randint(1, 4))}
        return "units", {"ticket_type_id": self.standing, "quantity": random.randint(1, 3)}

    async def hold(self, auth):
        kind, body = self.what()
        response = await self.c.post(
            "/holds", headers=auth, json={"event_id": self.event_id, **body}
        )
        self.note(f"POST /holds {kind}", response)
        return response.json()["id"] if response.status_code == 201 else None

    async def delete(self, auth, hold_id):
        self.note("DELETE /holds", await self.c.delete(f"/holds/{hold_id}", headers=auth))

    async def book(self, auth, op, body):
        token = "tok_visa" if random.random() < 0.75 else "tok_chargeDeclined"
        response = await self.c.post(
            "/bookings",
            json={"event_id": self.event_id, "payment": {"method": "card", "token": token}, **body},
            headers={**auth, "Idempotency-Key": uuid.uuid4().hex, "Prefer": "wait=10"},
        )
        self.note(f"POST /bookings {op}", response)
        if response.status_code == 201 and random.random() < 0.5:
            self.to_cancel.append((auth, response.json()["booking"]["id"]))

    async def cancel(self):
        auth, booking_id = self.to_cancel.pop(random.randrange(len(self.to_cancel)))
        response = await self.c.post(f"/bookings/{booking_id}/cancel", headers=auth)
        self.note("POST /bookings/{id}/cancel", response)

    async def one(self, auth):
        roll = random.random()
        if roll < 0.25:  # a hold, then deleted at once or soon, or left to expire
            hold_id = await self.hold(auth)
            if hold_id and random.random() < 0.5:
                await asyncio.sleep(random.uniform(0, 0.3))
                await self.delete(auth, hold_id)
        elif roll < 0.50:  # a booking of seats or units
            kind, body = self.what()
            await self.book(auth, kind, body)
        elif roll < 0.70:  # a hold, then booked
            hold_id = await self.hold(auth)
            if hold_id:
                await self.book(auth, "hold", {"hold_id": hold_id})
        elif roll < 0.80:  # a hold booked while its owner deletes it
            hold_id = await self.hold(auth)
            if hold_id:

                async def delete_soon():
                    await asyncio.sleep(random.uniform(0, 0.05))
                    await self.delete(auth, hold_id)

                await asyncio.gather(self.book(auth, "hold", {"hold_id": hold_id}), delete_soon())
        elif self.to_cancel:
            await self.cancel()
        else:
            await asyncio.sleep(0.01)

    async def loop(self, auth):
        me = asyncio.current_task()
        while self.running():
            await self.one(auth)
            if me in self.refused:  # sold out or taken: a real client would not hammer
                self.refused.discard(me)
                await asyncio.sleep(random.uniform(0.02, 0.1))

    async def expiring(self, auth):
        """Holds booked around the moment they expire (the sweeper works on them then)."""
        while time.monotonic() + HOLD_TTL + 1.5 < self.deadline:
            hold_id = await self.hold(auth)
            if hold_id is None:
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(HOLD_TTL + random.uniform(-0.3, 1.0))
            await self.book(auth, "hold", {"hold_id": hold_id})


UNFINISHED = """SELECT count(*) FROM bookings WHERE event_id = $1
                AND saga_state IN ('PENDING', 'SEATS_RESERVED', 'PAYMENT_PENDING')"""


async def drain(instance, conn, event_id):
    """Wait until the event's queue is empty and every booking has ended; what is left."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while True:
        queued = await instance.state.redis.xlen(keys.queue(event_id))
        unfinished = await conn.fetchval(UNFINISHED, event_id)
        if (queued == 0 and unfinished == 0) or time.monotonic() > deadline:
            return queued, unfinished
        await asyncio.sleep(0.2)


async def payment_problems(instance, conn, event_id):
    """Each booking against the provider's ledger: confirmed ones paid, others keep nothing."""
    problems = []
    rows = await conn.fetch(
        "SELECT id::text, saga_state, payment_id, total_cents FROM bookings WHERE event_id = $1",
        event_id,
    )
    ledger = TestProvider(instance.state.redis)  # the same ledger, without the test latency
    charges = await asyncio.gather(*(ledger.lookup(key=row["id"]) for row in rows))
    for row, charge in zip(rows, charges, strict=True):
        state = row["saga_state"]
        if state == "CONFIRMED":
            ok = (
                charge is not None
                and charge.status == "succeeded"
                and charge.id == row["payment_id"]
                and charge.amount_cents == row["total_cents"]
            )
        elif state == "CANCELLED":
            ok = charge is not None and charge.status == "refunded"
        else:  # FAILED: declined (nothing taken) or refunded
            ok = charge is None or charge.status == "refunded"
        if not ok:
            problems.append((row["id"], state, charge))
    return problems


# Each query returns the rows that break an invariant.
INVARIANTS = {
    "a seat with two live tickets": """
        SELECT seat_id::text, count(*) FROM tickets
        WHERE event_id = $1 AND seat_id IS NOT NULL AND status <> 'void'
        GROUP BY seat_id HAVING count(*) > 1""",
    "a sold seat without one live ticket of a confirmed booking naming it": """
        SELECT es.seat_id::text FROM event_seats es
        LEFT JOIN bookings b ON b.id = es.booking_id
        WHERE es.event_id = $1 AND es.status = 'sold'
          AND (b.saga_state IS DISTINCT FROM 'CONFIRMED'
               OR (SELECT count(*) FROM tickets t
                   WHERE t.event_id = es.event_id AND t.seat_id = es.seat_id
                     AND t.booking_id = es.booking_id AND t.status <> 'void') <> 1)""",
    "a live seat ticket whose seat is not sold to its booking": """
        SELECT t.id::text FROM tickets t
        JOIN event_seats es ON es.event_id = t.event_id AND es.seat_id = t.seat_id
        WHERE t.event_id = $1 AND t.status <> 'void'
          AND (es.status <> 'sold' OR es.booking_id IS DISTINCT FROM t.booking_id)""",
    "ticket type over capacity, or counters unlike the holds and tickets": """
        SELECT * FROM (
            SELECT tt.id::text, tt.capacity, tt.sold, tt.held,
                   (SELECT count(*) FROM tickets t
                    WHERE t.ticket_type_id = tt.id AND t.status <> 'void') AS tickets,
                   (SELECT coalesce(sum(h.quantity), 0) FROM holds h
                    WHERE h.ticket_type_id = tt.id AND h.status = 'active') AS holding
            FROM ticket_types tt WHERE tt.event_id = $1) c
        WHERE c.sold + c.held > c.capacity OR c.sold <> c.tickets OR c.held <> c.holding""",
    "a confirmed booking without its tickets, its payment or its booked hold": """
        SELECT b.id::text FROM bookings b LEFT JOIN holds h ON h.id = b.hold_id
        WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED'
          AND (b.payment_status <> 'succeeded' OR b.payment_id IS NULL
               OR (b.hold_id IS NOT NULL AND h.status IS DISTINCT FROM 'booked')
               OR (b.hold_id IS NULL AND b.request ? 'hold_id')
               OR (SELECT count(*) FROM booking_items i WHERE i.booking_id = b.id) = 0
               OR (SELECT count(*) FROM booking_items i WHERE i.booking_id = b.id)
                  <> (SELECT count(*) FROM tickets t
                      WHERE t.booking_id = b.id AND t.status <> 'void'))""",
    "a failed or cancelled booking holding seats, units or live tickets": """
        SELECT b.id::text, b.saga_state FROM bookings b
        WHERE b.event_id = $1 AND b.saga_state IN ('FAILED', 'CANCELLED')
          AND (EXISTS (SELECT 1 FROM event_seats es WHERE es.event_id = b.event_id
                       AND (es.booking_id = b.id
                            OR (es.hold_id = b.hold_id AND es.status = 'held')))
               OR EXISTS (SELECT 1 FROM holds h WHERE h.id = b.hold_id
                          AND h.status IN ('active', 'booked')
                          AND b.saga_state = 'FAILED')
               OR EXISTS (SELECT 1 FROM tickets t
                          WHERE t.booking_id = b.id AND t.status <> 'void'))""",
    "a cancelled booking not refunded": """
        SELECT id::text FROM bookings
        WHERE event_id = $1 AND saga_state = 'CANCELLED' AND payment_status <> 'refunded'""",
    "a booking failed for an internal error (its batch broke)": """
        SELECT id::text, failure_message FROM bookings
        WHERE event_id = $1 AND saga_state = 'FAILED' AND failure_code = 'internal'""",
    "a held seat whose hold is not active or does not name it": """
        SELECT es.seat_id::text FROM event_seats es LEFT JOIN holds h ON h.id = es.hold_id
        WHERE es.event_id = $1 AND es.status = 'held'
          AND (h.id IS NULL OR h.status <> 'active' OR NOT es.seat_id = ANY (h.seat_ids))""",
    "an active, unexpired seat hold that lost a seat": """
        SELECT h.id::text FROM holds h
        WHERE h.event_id = $1 AND h.status = 'active' AND h.expires_at > now()
          AND h.ticket_type_id IS NULL
          AND (SELECT count(*) FROM event_seats es WHERE es.event_id = h.event_id
               AND es.hold_id = h.id AND es.status = 'held') <> h.quantity""",
}

# What the database says ran (cancelled bookings were confirmed first).
TALLY = """
SELECT
  count(*) FILTER (WHERE saga_state IN ('CONFIRMED', 'CANCELLED') AND request ? 'seat_ids'
                   AND request ->> 'ticket_type_id' IS NULL AND NOT request ? 'hold_id')
    AS confirmed_seats,
  count(*) FILTER (WHERE saga_state IN ('CONFIRMED', 'CANCELLED')
                   AND request ->> 'ticket_type_id' IS NOT NULL) AS confirmed_units,
  count(*) FILTER (WHERE saga_state IN ('CONFIRMED', 'CANCELLED') AND request ? 'hold_id')
    AS confirmed_holds,
  count(*) FILTER (WHERE failure_code = 'payment_declined') AS declined,
  count(*) FILTER (WHERE failure_code = 'hold_expired') AS hold_expired,
  count(*) FILTER (WHERE saga_state = 'CANCELLED') AS cancelled,
  count(*) FILTER (WHERE saga_state = 'CONFIRMED') AS confirmed_now,
  count(*) AS bookings
FROM bookings WHERE event_id = $1
"""

HOLDS_TALLY = """
SELECT count(*) FILTER (WHERE status = 'expired' AND ticket_type_id IS NULL) AS expired_seat_holds,
       count(*) FILTER (WHERE status = 'expired' AND ticket_type_id IS NOT NULL)
         AS expired_unit_holds,
       count(*) FILTER (WHERE status = 'released') AS released,
       count(*) FILTER (WHERE status = 'booked') AS booked,
       count(*) AS holds
FROM holds WHERE event_id = $1
"""


async def test_all_locking_paths_at_once_never_deadlock(settings, database_url, caplog):
    caplog.set_level(logging.WARNING)
    before = await deadlock_count(database_url)
    async with running(settings) as (instance, c):
        event_id, seats, standing, _ = await published_event(
            c, rows=ROWS, per_row=PER_ROW, capacity=CAPACITY, max_per_order=100
        )
        users = [await buyer(c) for _ in range(USERS)]
        load = Load(c, event_id, seats, standing)
        began = time.monotonic()
        load.deadline = began + RUN_SECONDS
        await asyncio.gather(
            *(load.loop(auth) for auth in users for _ in range(LOOPS_PER_USER)),
            *(load.expiring(users[n % USERS]) for n in range(EXPIRING_LOOPS)),
        )
        load_seconds = time.monotonic() - began
        conn = await db.connect(settings.database_url)
        try:
            queued, unfinished = await drain(instance, conn, event_id)
            drain_seconds = time.monotonic() - began - load_seconds
            unpaid = await payment_problems(instance, conn, event_id)
        finally:
            await conn.close()
        restarts = {k: v for k, v in instance.state.supervisor.restarts.items() if v}
    # The instance is stopped and its connections closed: their statistics are flushed.
    after = before
    for _ in range(10):
        await asyncio.sleep(0.3)
        after = max(after, await deadlock_count(database_url))
    conn = await db.connect(settings.database_url)
    try:
        broken = {
            name: [tuple(r) for r in await conn.fetch(query, event_id)]
            for name, query in INVARIANTS.items()
        }
        tally = dict(await conn.fetchrow(TALLY, event_id))
        tally |= dict(await conn.fetchrow(HOLDS_TALLY, event_id))
    finally:
        await conn.close()
    deadlock_logs = [
        r.getMessage() + " " + str(r.exc_info[1] if r.exc_info else "")
        for r in caplog.records
        if "deadlock" in (r.getMessage() + str(r.exc_info[1] if r.exc_info else "")).lower()
    ]

    print(f"\nload ran {load_seconds:.1f} s, drained in {drain_seconds:.1f} s; requests:")
    for (op, status), n in sorted(load.counts.items()):
        print(f"  {op:28} {status}: {n}")
    print(f"database: {tally}")
    print(f"deadlocks before {before}, after {after}; worker restarts {restarts}")
    print(f"5xx answers: {len(load.server_errors)}; unexpected answers: {len(load.unexpected)}")
    print(f"after the load: {queued} queued, {unfinished} unfinished; ledger problems {unpaid[:3]}")
    print(f"invariants broken: {({n: len(rows) for n, rows in broken.items() if rows}) or 'none'}")
    for line in deadlock_logs[:5]:
        print(f"  logged: {line[:300]}")
    for op, status, text in load.server_errors[:5] + load.unexpected[:5]:
        print(f"  {op} {status}: {text}")

    assert after == before, f"{after - before} deadlock(s) in the database during the run"
    assert not load.server_errors, load.server_errors[:5]
    assert queued == 0 and unfinished == 0, (
        f"{queued} request(s) still queued, {unfinished} booking(s) unfinished"
        f" {DRAIN_SECONDS} s after the load"
    )
    assert not load.unexpected, load.unexpected[:5]
    assert not unpaid, unpaid[:5]
    assert {name: rows for name, rows in broken.items() if rows} == {}
    ran = {
        "holds of seats made": load.counts[("POST /holds seats", 201)],
        "holds of units made": load.counts[("POST /holds units", 201)],
        "holds deleted": load.counts[("DELETE /holds", 204)],
        "seat holds expired (swept)": tally["expired_seat_holds"],
        "seat bookings confirmed": tally["confirmed_seats"],
        "unit bookings confirmed": tally["confirmed_units"],
        "hold bookings confirmed": tally["confirmed_holds"],
        "bookings declined": tally["declined"],
        "bookings cancelled": load.counts[("POST /bookings/{id}/cancel", 200)],
    }
    assert {k: n for k, n in ran.items() if n < AT_LEAST} == {}, ran
