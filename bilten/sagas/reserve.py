"""The saga's first step: PENDING → PAYMENT_PENDING (seats reserved), or FAILED.

The bookings are locked together; every seat they ask for is locked in one statement (in seat
order, like every claim), then given out all-or-nothing per booking in arrival order (first
come, first served); units are claimed by a conditional update that cannot pass capacity; a
booking of a hold takes that hold over. Holds, items, states, transitions and outbox rows are
then written in one statement each. PAYMENT_PENDING is committed before any provider call, so a
crash leaves an outcome that recovery looks up instead of guessing.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bilten import holds, outbox
from bilten.db import Connection
from bilten.errors import ApiError
from bilten.sagas.steps import (
    MANY_UNLESS_LOCKED,
    PAYMENT_WINDOW,
    Outcome,
    Payable,
    fail_many,
    lock_types,
    outcome_of,
)

# The transition, its history step included, in one statement (the seats were reserved: the
# booking goes on to its payment; SEATS_RESERVED is never a state of its own on disk).
_RESERVED = """
UPDATE bookings b SET hold_id = r.hold_id, total_cents = r.total,
       saga_state = 'PAYMENT_PENDING', updated_at = now(),
       history = b.history || jsonb_build_object(
           'from', 'PENDING', 'to', 'PAYMENT_PENDING', 'reason', 'seats_reserved', 'at', now())
FROM unnest($1::uuid[], $2::uuid[], $3::int[]) AS r(id, hold_id, total)
WHERE b.id = r.id
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


@dataclass
class Reserved:
    row: Any
    hold_id: str
    items: list[holds.Item]
    adopted: bool
    seat_ids: list[str]
    ticket_type_id: str | None


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


async def _adopt_hold(conn: Connection, row: Any, hold_id: str) -> tuple[str, list[holds.Item]]:
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
    window = timedelta(seconds=PAYMENT_WINDOW)
    await conn.execute(
        "UPDATE holds SET expires_at = greatest(expires_at, now() + $2::interval) WHERE id = $1",
        hold_id,
        window,
    )
    await conn.execute(
        """UPDATE event_seats SET hold_expires_at = greatest(hold_expires_at, now() + $3::interval)
           WHERE event_id = $1 AND seat_id = ANY ($4::uuid[]) AND hold_id = $2""",
        row["event_id"],
        hold_id,
        window,
        hold["seat_ids"],
    )
    return hold_id, items


async def _reserve_event(
    conn: Connection, event_id: str, rows: list[Any]
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
    expires_at = await conn.fetchval(
        "SELECT now() + $1::interval", timedelta(seconds=PAYMENT_WINDOW)
    )
    seat_changes: list[tuple[str, str, int]] = []
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
    winners: list[tuple[str, str]] = []  # (seat id, hold id)
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
                hold_id, items = await _adopt_hold(conn, row, request["hold_id"])
                adopted.add(hold_id)
                reserved.append(Reserved(row, hold_id, items, True, [], None))
                continue
            seat_ids: list[str] = request.get("seat_ids") or []
            ticket_type_id: str | None = request.get("ticket_type_id")
            quantity = len(seat_ids) or int(request.get("quantity") or 0)
            if quantity > limit:
                raise holds.over_order_limit(limit, bool(seat_ids))
            already = room.get(row["user_id"], 0)
            if already + quantity > limit:
                raise holds.over_person_limit(limit, already)
            hold_id = str(uuid.uuid4())
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
                    winners.append((s, hold_id))
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
        reserved.append(Reserved(row, hold_id, items, False, seat_ids, ticket_type_id))
    for type_id, kind in kinds.items():
        if kind is not None and units_left[type_id] < kind["remaining"]:
            await holds.take_units(conn, type_id, kind["remaining"] - units_left[type_id])
            units_changed = True
    if winners:
        claimed = await conn.fetch(
            """UPDATE event_seats es
               SET status = 'held', hold_id = w.hold_id, hold_expires_at = $2, booking_id = NULL,
                   version = nextval('catalog_version')
               FROM unnest($3::uuid[], $4::uuid[]) AS w(seat_id, hold_id)
               WHERE es.event_id = $1 AND es.seat_id = w.seat_id
               RETURNING es.seat_id::text, es.version""",
            event_id,
            expires_at,
            [s for s, _ in winners],
            [h for _, h in winners],
        )
        seat_changes += [(c["seat_id"], "held", c["version"]) for c in claimed]
    fresh = [r for r in reserved if not r.adopted]
    if fresh:
        await conn.execute(
            """INSERT INTO holds (id, event_id, user_id, ticket_type_id, seat_ids, quantity,
                                  amount_cents, currency, expires_at)
               SELECT h.id, $1, h.user_id, h.ticket_type_id, ARRAY(
                          SELECT jsonb_array_elements_text(h.seats::jsonb))::uuid[],
                      h.quantity, h.amount, $2, $3
               FROM unnest($4::uuid[], $5::uuid[], $6::uuid[], $7::text[], $8::int[], $9::int[])
                    AS h(id, user_id, ticket_type_id, seats, quantity, amount)""",
            event_id,
            event["currency"],
            expires_at,
            [r.hold_id for r in fresh],
            [r.row["user_id"] for r in fresh],
            [r.ticket_type_id for r in fresh],
            [_json_list(r.seat_ids) for r in fresh],
            [len(r.items) for r in fresh],
            [sum(i.price_cents for i in r.items) for r in fresh],
        )
    outbox_rows = outbox.seat_rows(event_id, seat_changes)
    if units_changed:
        outbox_rows.append(("catalog", {"event_id": event_id}))
    await outbox.add_many(conn, outbox_rows)
    return reserved, failed


def _json_list(values: list[str]) -> str:
    return "[" + ",".join(f'"{v}"' for v in values) + "]"


async def reserve(
    conn: Connection, booking_ids: list[str]
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
    reserved: list[Reserved] = []
    failed: list[tuple[Any, ApiError]] = []
    for event_id, event_rows in sorted(pending_by_event.items()):  # events in one order too
        ok, bad = await _reserve_event(conn, event_id, event_rows)
        reserved += ok
        failed += bad
    if reserved:
        items = [(r.row["id"], n, i) for r in reserved for n, i in enumerate(r.items)]
        await conn.execute(
            """INSERT INTO booking_items (booking_id, position, seat_id, ticket_type_id,
                                          label, price_cents)
               SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::uuid[],
                                    $5::text[], $6::int[])""",
            [b for b, _, _ in items],
            [n for _, n, _ in items],
            [i.seat_id for _, _, i in items],
            [i.ticket_type_id for _, _, i in items],
            [i.label for _, _, i in items],
            [i.price_cents for _, _, i in items],
        )
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
    for r in reserved:
        outcomes[r.row["id"]] = Outcome(
            r.row["id"], r.row["user_id"], r.row["event_id"], "PAYMENT_PENDING"
        )
        payable[r.row["id"]] = Payable(
            sum(i.price_cents for i in r.items), r.row["currency"], r.row["payment_token"]
        )
    return outcomes, payable
