"""The saga's first step: PENDING → PAYMENT_PENDING (seats reserved), or FAILED.

The bookings are locked together; every seat they ask for is locked in one statement (in seat
order, like every claim), then given out all-or-nothing per booking in arrival order (first
come, first served); units are claimed by a conditional update that cannot pass capacity; a
booking of a hold takes that hold over. A booking of seats or units holds them itself, with no
hold row: its seats are written once, ``sold`` to it, and given back should it fail
(``finish``); its units are held on the ticket type until then. Items, states and outbox rows
are then written in one statement each. PAYMENT_PENDING is committed before any provider call,
so a crash leaves an outcome that recovery looks up instead of guessing.

Queued requests (:func:`reserve_new`) have no booking row yet: theirs is written once, after
the seats were given out, already PAYMENT_PENDING or FAILED. :func:`reserve` moves rows that
exist (PENDING bookings written before this was so, a batch handled again).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bilten import holds, metrics, outbox
from bilten.db import Connection
from bilten.errors import ApiError
from bilten.queue import Request
from bilten.sagas.steps import (
    MANY_UNLESS_LOCKED,
    PAYMENT_WINDOW,
    Outcome,
    Payable,
    fail_many,
    lock_types,
    outcome_of,
    result_message,
)

# The transition, its history step included, in one statement (the seats were reserved: the
# booking goes on to its payment; SEATS_RESERVED is never a state of its own on disk).
_RESERVED = """
UPDATE bookings b SET hold_id = r.hold_id, total_cents = r.total,
       saga_state = 'PAYMENT_PENDING', updated_at = now(),
       history = b.history || jsonb_build_object(
           'from', 'PENDING', 'to', 'PAYMENT_PENDING', 'reason', 'seats_reserved', 'at', now())
FROM unnest($1::uuid[], $2::uuid[], $3::int[]) AS r(id, hold_id, total)
WHERE b.id = ANY ($1::uuid[]) AND b.id = r.id
"""

_LOCK_SEATS = """
SELECT es.seat_id::text, s.label, t.price_cents,
       es.status = 'available' OR (es.status = 'held' AND es.hold_expires_at <= now()) AS free
FROM event_seats es JOIN seats s ON s.id = es.seat_id JOIN price_tiers t ON t.id = es.tier_id
WHERE es.event_id = $1
  AND es.seat_id = ANY ($2::uuid[] || ARRAY(SELECT unnest(h.seat_ids) FROM holds h
                                            WHERE h.id = ANY ($3::uuid[])))
  AND (es.seat_id = ANY ($2::uuid[]) OR es.hold_id = ANY ($3::uuid[]))
ORDER BY es.seat_id
FOR UPDATE OF es
"""


# The seats won, sold to their bookings, and their delta (outbox.seat_rows's payload) in one
# statement. The seat ids are named as an array too, so that the rows are found by primary key
# whatever the statistics say (a new event's seats are not in them yet: the planner then hashed
# every seat of the event for each call). Every statement that joins an array of keys to
# event_seats or bookings does the same.
_SELL = """
WITH sold AS (
    UPDATE event_seats es
    SET status = 'sold', booking_id = w.booking_id, hold_id = NULL, hold_expires_at = NULL,
        version = nextval('catalog_version')
    FROM unnest($2::uuid[], $3::uuid[]) AS w(seat_id, booking_id)
    WHERE es.event_id = $1 AND es.seat_id = ANY ($2::uuid[]) AND es.seat_id = w.seat_id
    RETURNING es.seat_id, es.version)
INSERT INTO outbox (topic, payload)
SELECT 'seats', jsonb_build_object(
    'type', 'seats', 'event_id', $1::text, 'version', max(version),
    'changes', jsonb_agg(jsonb_build_object(
        'seat_id', seat_id::text, 'status', 'sold', 'version', version)))
FROM sold HAVING count(*) > 0
"""


@dataclass
class Reserved:
    row: Any
    hold_id: str | None  # the hold taken over; None for a booking holding its own
    items: list[holds.Item]


async def _items_of_hold(conn: Connection, hold: Any) -> list[holds.Item]:
    if hold["ticket_type_id"]:
        kind = await conn.fetchrow(
            "SELECT name, price_cents FROM ticket_types WHERE id = $1", hold["ticket_type_id"]
        )
        return [
            holds.Item(
                ticket_type_id=hold["ticket_type_id"],
                label=kind["name"],
                price_cents=kind["price_cents"],
            )
            for _ in range(hold["quantity"])
        ]
    rows = await conn.fetch(
        """SELECT es.seat_id::text AS seat_id, s.label, t.price_cents
           FROM event_seats es JOIN seats s ON s.id = es.seat_id
           JOIN price_tiers t ON t.id = es.tier_id
           WHERE es.event_id = $1 AND es.seat_id = ANY ($3::uuid[]) AND es.hold_id = $2
             AND es.status = 'held'
           ORDER BY s.label""",
        hold["event_id"],
        hold["id"],
        hold["seat_ids"],
    )
    return [
        holds.Item(seat_id=r["seat_id"], label=r["label"], price_cents=r["price_cents"])
        for r in rows
    ]


async def _adopt_hold(
    conn: Connection, row: Any, hold_id: str, window: float
) -> tuple[str, list[holds.Item]]:
    """Take over the shopper's hold for this booking, stretched over the payment window."""
    hold = await conn.fetchrow(
        """SELECT id::text, event_id::text, user_id::text, ticket_type_id::text, seat_ids,
                  quantity, status, expires_at <= now() AS expired
           FROM holds WHERE id = $1 FOR UPDATE""",
        hold_id,
    )
    if hold is None or hold["user_id"] != row["user_id"] or hold["event_id"] != row["event_id"]:
        raise ApiError("not_found", "No such hold.")
    if hold["status"] != "active" or hold["expired"]:
        raise ApiError("hold_expired", "The hold ran out before the booking.")
    taken = await conn.fetchval(
        """SELECT 1 FROM bookings WHERE hold_id = $1 AND id <> $2 AND saga_state <> 'FAILED'""",
        hold_id,
        row["id"],
    )
    if taken:
        raise ApiError("conflict", "Another booking is using this hold.", {"hold_id": hold_id})
    items = await _items_of_hold(conn, hold)
    if len(items) != hold["quantity"]:
        raise ApiError("hold_expired", "The hold ran out before the booking.")
    stretched = timedelta(seconds=window)
    await conn.execute(
        "UPDATE holds SET expires_at = greatest(expires_at, now() + $2::interval) WHERE id = $1",
        hold_id,
        stretched,
    )
    await conn.execute(
        """UPDATE event_seats SET hold_expires_at = greatest(hold_expires_at, now() + $3::interval)
           WHERE event_id = $1 AND seat_id = ANY ($4::uuid[]) AND hold_id = $2""",
        row["event_id"],
        hold_id,
        stretched,
        hold["seat_ids"],
    )
    return hold_id, items


async def _reserve_event(
    conn: Connection, event_id: str, rows: list[Any], window: float
) -> tuple[list[Reserved], list[tuple[Any, ApiError]]]:
    reserved: list[Reserved] = []
    failed: list[tuple[Any, ApiError]] = []
    try:
        event = await holds.event_for_sale(conn, event_id)
    except ApiError as error:
        return [], [(row, error) for row in rows]
    limit = event["max_tickets_per_order"]
    # The one lock order (docs/bookings.md): bookings (the caller's), per-person locks, holds,
    # ticket types, seats; each kind all at once, by id. Holds: those taken over, and the
    # expired ones of the unit types asked for (their units are reclaimed by the claims).
    room = await holds.tickets_per_person(conn, event_id, [row["user_id"] for row in rows])
    adopting = sorted({row["request"]["hold_id"] for row in rows if row["request"].get("hold_id")})
    unit_types = sorted(
        {
            row["request"]["ticket_type_id"]
            for row in rows
            if row["request"].get("ticket_type_id") and not row["request"].get("hold_id")
        }
    )
    if adopting or unit_types:
        await conn.execute(
            """SELECT 1 FROM holds
               WHERE id = ANY ($1::uuid[])
                  OR (event_id = $2 AND ticket_type_id = ANY ($3::uuid[]) AND status = 'active'
                      AND expires_at <= now())
               ORDER BY id FOR UPDATE""",
            adopting,
            event_id,
            unit_types,
        )
    await lock_types(conn, unit_types)
    # Each ticket type asked for: its expired unit holds reclaimed once, its units left counted
    # down here in arrival order, and what was won taken in one statement at the end.
    kinds = {t: await holds.reclaim_units(conn, event_id, t) for t in unit_types}
    units_left = {t: kind["remaining"] for t, kind in kinds.items() if kind is not None}
    units_changed = False
    # Every seat the batch asks for (and those of the holds it takes over), locked at once in
    # seat order; who gets which is then decided here, in arrival order, and written in one
    # statement.
    wanted = sorted(
        {
            s
            for row in rows
            if not row["request"].get("hold_id")
            for s in row["request"].get("seat_ids") or []
        }
    )
    free: dict[str, tuple[str, int]] = {}
    known: set[str] = set()
    if wanted or adopting:
        for seat in await conn.fetch(_LOCK_SEATS, event_id, wanted, adopting):
            known.add(seat["seat_id"])
            if seat["free"]:
                free[seat["seat_id"]] = (seat["label"], seat["price_cents"])
    winners: list[tuple[str, str]] = []  # (seat id, booking id)
    adopted: set[str] = set()  # holds taken by earlier bookings of this batch
    for row in rows:
        request = row["request"]
        try:
            if request.get("hold_id"):
                if request["hold_id"] in adopted:
                    raise ApiError(
                        "conflict",
                        "Another booking is using this hold.",
                        {"hold_id": request["hold_id"]},
                    )
                hold_id, items = await _adopt_hold(conn, row, request["hold_id"], window)
                adopted.add(hold_id)
                reserved.append(Reserved(row, hold_id, items))
                continue
            seat_ids: list[str] = request.get("seat_ids") or []
            ticket_type_id: str | None = request.get("ticket_type_id")
            quantity = len(seat_ids) or int(request.get("quantity") or 0)
            if quantity > limit:
                raise holds.over_order_limit(limit, bool(seat_ids))
            already = room.get(row["user_id"], 0)
            if already + quantity > limit:
                raise holds.over_person_limit(limit, already)
            if seat_ids:
                unknown = [s for s in seat_ids if s not in known]
                if unknown:
                    raise holds.not_seats_of_event(unknown)
                taken = [s for s in seat_ids if s not in free]
                if taken:
                    raise holds.seat_unavailable(taken)
                items = [
                    holds.Item(seat_id=s, label=free[s][0], price_cents=free[s][1])
                    for s in sorted(seat_ids, key=lambda s: free[s][0])
                ]
                for s in seat_ids:
                    del free[s]
                    winners.append((s, row["id"]))
            else:
                assert ticket_type_id is not None
                kind = kinds[ticket_type_id]
                if kind is None:
                    raise holds.unknown_ticket_type()
                if quantity > units_left[ticket_type_id]:
                    raise holds.too_few_units(kind, ticket_type_id, units_left[ticket_type_id])
                units_left[ticket_type_id] -= quantity
                items = holds.unit_items(kind, ticket_type_id, quantity)
        except ApiError as error:
            failed.append((row, error))
            continue
        room[row["user_id"]] = room.get(row["user_id"], 0) + quantity
        reserved.append(Reserved(row, None, items))
    for type_id, kind in kinds.items():
        if kind is not None and units_left[type_id] < kind["remaining"]:
            await holds.take_units(conn, type_id, kind["remaining"] - units_left[type_id])
            units_changed = True
    if winners:
        # Sold to the booking at once: the seat row is written once for a booking that is paid
        # (and once more, back to available, for one that fails).
        await conn.execute(_SELL, event_id, [s for s, _ in winners], [b for _, b in winners])
    if units_changed:
        await outbox.catalog_changed(conn, event_id)
    return reserved, failed


async def _reserve_events(
    conn: Connection, by_event: dict[str, list[Any]], window: float
) -> tuple[list[Reserved], list[tuple[Any, ApiError]]]:
    """:func:`_reserve_event` for each event's rows, the events in one order too."""
    reserved: list[Reserved] = []
    failed: list[tuple[Any, ApiError]] = []
    for event_id, event_rows in sorted(by_event.items()):
        ok, bad = await _reserve_event(conn, event_id, event_rows, window)
        reserved += ok
        failed += bad
    return reserved, failed


async def reserve(
    conn: Connection, booking_ids: list[str], window: float = PAYMENT_WINDOW
) -> tuple[dict[str, Outcome | None], dict[str, Payable]]:
    """PENDING → PAYMENT_PENDING (seats reserved), or FAILED, in the caller's transaction; None
    for bookings another worker has. Also returns what each booking to charge pays: those just
    reserved, and those a stopped worker left PAYMENT_PENDING (charging again with the same key
    finds the first charge, if there was one)."""
    outcomes: dict[str, Outcome | None] = dict.fromkeys(booking_ids)
    rows = await conn.fetch(MANY_UNLESS_LOCKED, booking_ids)
    by_id = {row["id"]: row for row in rows}
    pending_by_event: dict[str, list[Any]] = defaultdict(list)
    payable: dict[str, Payable] = {}
    for booking_id in booking_ids:  # arrival order
        row = by_id.get(booking_id)
        if row is None:
            continue
        if row["saga_state"] != "PENDING":
            outcomes[booking_id] = outcome_of(row)
            if row["saga_state"] == "PAYMENT_PENDING":
                # Reserved by a worker that stopped: charging again with the same key finds
                # the first charge, if there was one.
                payable[booking_id] = Payable(
                    row["total_cents"], row["currency"], row["payment_token"]
                )
        else:
            pending_by_event[row["event_id"]].append(row)
    reserved, failed = await _reserve_events(conn, pending_by_event, window)
    if reserved:
        await _write_items(conn, reserved)
        # PAYMENT_PENDING is committed before any provider call: a crash leaves an
        # outcome that recovery looks up instead of guessing.
        await conn.execute(
            _RESERVED,
            [r.row["id"] for r in reserved],
            [r.hold_id for r in reserved],
            [sum(i.price_cents for i in r.items) for r in reserved],
        )
    for outcome in await fail_many(conn, failed):
        outcomes[outcome.booking_id] = outcome
    _reserved_outcomes(reserved, outcomes, payable)
    return outcomes, payable


def _reserved_outcomes(
    reserved: list[Reserved], outcomes: dict[str, Outcome | None], payable: dict[str, Payable]
) -> None:
    for r in reserved:
        outcomes[r.row["id"]] = Outcome(
            r.row["id"], r.row["user_id"], r.row["event_id"], "PAYMENT_PENDING"
        )
        payable[r.row["id"]] = Payable(
            sum(i.price_cents for i in r.items), r.row["currency"], r.row["payment_token"]
        )


def _items(reserved: list[Reserved]) -> tuple[list[Any], ...]:
    """The reserved bookings' items as columns: booking id, position, seat, ticket type, label,
    price."""
    items = [(r.row["id"], n, i) for r in reserved for n, i in enumerate(r.items)]
    return (
        [b for b, _, _ in items],
        [n for _, n, _ in items],
        [i.seat_id for _, _, i in items],
        [i.ticket_type_id for _, _, i in items],
        [i.label for _, _, i in items],
        [i.price_cents for _, _, i in items],
    )


async def _write_items(conn: Connection, reserved: list[Reserved]) -> None:
    await conn.execute(
        """INSERT INTO booking_items (booking_id, position, seat_id, ticket_type_id,
                                      label, price_cents)
           SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::uuid[],
                                $5::text[], $6::int[])""",
        *_items(reserved),
    )


# New bookings written once, already past their first step: PAYMENT_PENDING with their hold
# and total, or FAILED with the reason (its buyer's message in the same statement); their
# history holds both steps, their items go with them. No row is written PENDING and moved at
# once. (The items' foreign key is checked at the end of the statement, the bookings there.)
_INSERT_DECIDED = """
WITH r AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[],
                         $7::text[], $8::text[], $9::text[], $10::uuid[], $11::int[], $12::text[],
                         $13::text[], $14::jsonb[], $15::jsonb[])
        AS r(id, user_id, event_id, key, digest, request, currency, provider, token, hold_id,
             total, code, message, details, note)),
i AS (
    SELECT * FROM unnest($16::uuid[], $17::int[], $18::uuid[], $19::uuid[], $20::text[],
                         $21::int[])
        AS i(booking_id, position, seat_id, ticket_type_id, label, price_cents)),
made AS (
    INSERT INTO bookings (id, user_id, event_id, idempotency_key, body_hash, request, currency,
                          payment_provider, payment_token, hold_id, total_cents, saga_state,
                          payment_status, failure_code, failure_message, failure_details,
                          history)
    SELECT r.id, r.user_id, r.event_id, r.key, r.digest, r.request, r.currency, r.provider,
           CASE WHEN r.code IS NULL THEN r.token ELSE '' END, r.hold_id, r.total,
           CASE WHEN r.code IS NULL THEN 'PAYMENT_PENDING' ELSE 'FAILED' END,
           CASE WHEN r.code IS NULL THEN 'pending' ELSE 'failed' END,
           r.code, r.message, r.details,
           jsonb_build_array(
               jsonb_build_object('to', 'PENDING', 'reason', 'requested', 'at', now()),
               CASE WHEN r.code IS NULL
                    THEN jsonb_build_object('from', 'PENDING', 'to', 'PAYMENT_PENDING',
                                            'reason', 'seats_reserved', 'at', now())
                    ELSE jsonb_build_object('from', 'PENDING', 'to', 'FAILED',
                                            'reason', r.code, 'at', now()) END)
    FROM r
    ON CONFLICT DO NOTHING
    RETURNING id),
told AS (
    INSERT INTO outbox (topic, payload)
    SELECT 'users', jsonb_agg(r.note) FROM r JOIN made USING (id) WHERE r.code IS NOT NULL
    HAVING count(*) > 0),
items AS (
    INSERT INTO booking_items (booking_id, position, seat_id, ticket_type_id, label,
                               price_cents)
    SELECT i.* FROM i JOIN made ON made.id = i.booking_id)
SELECT count(*) FROM made
"""


class Raced(Exception):
    """A booking of the same user and Idempotency-Key was written meanwhile (by another
    event's worker): the batch runs again, and finds it."""


async def reserve_new(
    conn: Connection,
    requests: list[Request],
    currencies: dict[str, str],
    window: float = PAYMENT_WINDOW,
) -> tuple[dict[str, Outcome | None], dict[str, Payable]]:
    """The first step for queued requests that have no booking yet (``bookings.standing``):
    their seats reserved in arrival order as :func:`reserve` does, and each booking then
    written once, PAYMENT_PENDING or FAILED, in the caller's transaction. Returns the same as
    :func:`reserve`."""
    outcomes: dict[str, Outcome | None] = {}
    payable: dict[str, Payable] = {}
    if not requests:
        return outcomes, payable
    by_event: dict[str, list[Any]] = defaultdict(list)
    of_row: dict[str, Request] = {}
    for request in requests:  # arrival order
        of_row[request.id] = request
        by_event[request.event_id].append(
            {
                "id": request.id,
                "user_id": request.user_id,
                "event_id": request.event_id,
                "request": request.request,
                "saga_state": "PENDING",
                "currency": currencies[request.event_id],
                "payment_token": request.token,
            }
        )
    reserved, failed = await _reserve_events(conn, by_event, window)
    hold_of = {r.row["id"]: r.hold_id for r in reserved}  # None: the booking holds its own
    total_of = {r.row["id"]: sum(i.price_cents for i in r.items) for r in reserved}
    error_of = {row["id"]: error for row, error in failed}
    # In one key order, as every writer of bookings: inserts of the same user and key wait for
    # one another in that order, never in a circle.
    ids = sorted(
        (r.id for r in requests if r.id in hold_of or r.id in error_of),
        key=lambda i: (of_row[i].user_id, of_row[i].key),
    )
    items = _items(reserved)
    made = await conn.fetchval(
        _INSERT_DECIDED,
        ids,
        [of_row[i].user_id for i in ids],
        [of_row[i].event_id for i in ids],
        [of_row[i].key for i in ids],
        [of_row[i].digest for i in ids],
        [of_row[i].request for i in ids],
        [currencies[of_row[i].event_id] for i in ids],
        [of_row[i].provider for i in ids],
        [of_row[i].token for i in ids],
        [hold_of.get(i) for i in ids],
        [total_of.get(i, 0) for i in ids],
        [error_of[i].code if i in error_of else None for i in ids],
        [error_of[i].message if i in error_of else None for i in ids],
        [(error_of[i].details or {}) if i in error_of else None for i in ids],
        [
            {
                "user_id": of_row[i].user_id,
                "message": result_message(i, "failed", error_of[i]),
            }
            if i in error_of
            else None
            for i in ids
        ],
        *items,
    )
    if made != len(ids):
        raise Raced(f"{len(ids) - made} of {len(ids)} bookings were written meanwhile")
    for row, error in failed:
        metrics.BOOKINGS.labels("failed", error.code).inc()
        outcomes[row["id"]] = Outcome(row["id"], row["user_id"], row["event_id"], "FAILED", error)
    _reserved_outcomes(reserved, outcomes, payable)
    return outcomes, payable
