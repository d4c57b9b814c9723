"""Holds: a shopper's seats or general-admission units, kept for a few minutes.

Seats are claimed by one statement that locks the requested rows in a fixed order (so two
claims never deadlock), checks that every one is free (available, or held by an expired hold)
and takes all of them or none. Units are claimed by a conditional update of the ticket type's
counters that a CHECK constraint also guards. Every change moves the seats' versions (from the
catalog sequence: no hot row) and writes an outbox row with the changed seats.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any

import msgspec

from bilten import outbox
from bilten.db import Connection
from bilten.errors import ApiError


class Hold(msgspec.Struct, kw_only=True):
    id: str
    event_id: str
    seat_ids: list[str]
    ticket_type_id: str | None
    quantity: int
    amount_cents: int
    currency: str
    expires_at: datetime


class Item(msgspec.Struct, kw_only=True):
    seat_id: str | None = None
    ticket_type_id: str | None = None
    label: str
    price_cents: int


HOLD = """id::text, event_id::text, seat_ids::text[] AS seat_ids, ticket_type_id::text,
          quantity, amount_cents, currency, expires_at"""

# Lock the requested seats in seat-id order, then take them only if every one is free.
_CLAIM_SEATS = """
WITH wanted AS (
    SELECT seat_id, status, hold_expires_at FROM event_seats
    WHERE event_id = $1 AND seat_id = ANY ($2::uuid[])
    ORDER BY seat_id
    FOR UPDATE
), free AS (
    SELECT count(*) FILTER (WHERE status = 'available'
                            OR (status = 'held' AND hold_expires_at <= now())) AS free,
           count(*) AS found
    FROM wanted
), claimed AS (
    UPDATE event_seats es
    SET status = 'held', hold_id = $3, hold_expires_at = $4, booking_id = NULL,
        version = nextval('catalog_version')
    FROM free
    WHERE es.event_id = $1 AND es.seat_id = ANY ($2::uuid[])
      AND free.free = cardinality($2::uuid[])
    RETURNING es.seat_id, es.version, es.tier_id
)
SELECT c.seat_id::text, c.version, s.label, t.price_cents
FROM claimed c JOIN seats s ON s.id = c.seat_id JOIN price_tiers t ON t.id = c.tier_id
ORDER BY s.label
"""

_UNAVAILABLE = """
SELECT seat_id::text FROM event_seats
WHERE event_id = $1 AND seat_id = ANY ($2::uuid[])
  AND NOT (status = 'available' OR (status = 'held' AND hold_expires_at <= now()))
"""

_KNOWN_SEATS = """
SELECT seat_id::text FROM event_seats WHERE event_id = $1 AND seat_id = ANY ($2::uuid[])
"""

# Expired unit holds give their units back first, so they count as available at once.
_RECLAIM_UNITS = """
WITH expired AS (
    UPDATE holds SET status = 'expired'
    WHERE id IN (SELECT id FROM holds
                 WHERE ticket_type_id = $1 AND event_id = $2 AND status = 'active'
                   AND expires_at <= now()
                 ORDER BY id FOR UPDATE)
    RETURNING quantity
)
UPDATE ticket_types SET held = held - (SELECT coalesce(sum(quantity), 0) FROM expired),
                        version = nextval('catalog_version')
WHERE id = $1 AND event_id = $2
RETURNING name, price_cents, capacity - sold - held AS remaining
"""

_CLAIM_UNITS = """
UPDATE ticket_types SET held = held + $2, version = nextval('catalog_version')
WHERE id = $1 AND capacity - sold - held >= $2
RETURNING held
"""


def seat_unavailable(seat_ids: list[str]) -> ApiError:
    return ApiError(
        "seat_unavailable", "A requested seat is held or sold.", {"seat_ids": sorted(seat_ids)}
    )


async def claim_seats(
    conn: Connection, event_id: str, seat_ids: list[str], hold_id: str, expires_at: datetime
) -> tuple[list[Item], list[tuple[str, str, int]]]:
    """Hold every seat or none: the items with their prices, and the seat changes for the
    outbox. Raises ``seat_unavailable`` naming the seats that are taken."""
    claimed = await conn.fetch(_CLAIM_SEATS, event_id, seat_ids, hold_id, expires_at)
    if len(claimed) != len(seat_ids):
        taken = [r["seat_id"] for r in await conn.fetch(_UNAVAILABLE, event_id, seat_ids)]
        known = {r["seat_id"] for r in await conn.fetch(_KNOWN_SEATS, event_id, seat_ids)}
        unknown = [s for s in seat_ids if s not in known]
        if unknown:
            raise not_seats_of_event(unknown)
        raise seat_unavailable(taken or seat_ids)
    items = [
        Item(seat_id=r["seat_id"], label=r["label"], price_cents=r["price_cents"]) for r in claimed
    ]
    return items, [(r["seat_id"], "held", r["version"]) for r in claimed]


async def tickets_per_person(
    conn: Connection, event_id: str, user_ids: list[str]
) -> dict[str, int]:
    """What each user already holds or bought for the event, for the per-person limit. Their
    checks are locked until the transaction ends (an advisory lock per user and event, taken in
    key order): one user's parallel requests cannot pass the limit together."""
    users = sorted(set(user_ids))
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest($1::text[]) AS k ORDER BY k",
        [f"{user}:{event_id}" for user in users],
    )
    counts = await conn.fetch(
        """SELECT u.id::text AS user_id,
                  coalesce((SELECT sum(quantity) FROM holds h WHERE h.user_id = u.id
                            AND h.event_id = $2 AND h.status = 'active'
                            AND h.expires_at > now()), 0)
                + (SELECT count(*) FROM tickets t WHERE t.user_id = u.id AND t.event_id = $2
                   AND t.status <> 'void') AS n
           FROM unnest($1::uuid[]) AS u(id)""",
        users,
        event_id,
    )
    return {r["user_id"]: int(r["n"]) for r in counts}


async def claim_units(
    conn: Connection, event_id: str, ticket_type_id: str, quantity: int
) -> list[Item]:
    """Hold ``quantity`` units of a ticket type, or raise ``sold_out``."""
    kind = await conn.fetchrow(_RECLAIM_UNITS, ticket_type_id, event_id)
    if kind is None:
        raise ApiError(
            "validation_error",
            "ticket_type_id: not a ticket type of this event",
            {"fields": [{"field": "ticket_type_id", "message": "unknown ticket type"}]},
        )
    if await conn.fetchval(_CLAIM_UNITS, ticket_type_id, quantity) is not None:
        await outbox.catalog_changed(conn, event_id)
    else:
        raise ApiError(
            "sold_out",
            f"Only {kind['remaining']} left of {kind['name']}.",
            {"ticket_type_id": ticket_type_id, "remaining": kind["remaining"]},
        )
    return [
        Item(ticket_type_id=ticket_type_id, label=kind["name"], price_cents=kind["price_cents"])
        for _ in range(quantity)
    ]


async def event_for_sale(conn: Connection, event_id: str) -> Any:
    """The event's currency and per-order limit when it is on sale; an API error otherwise."""
    row = await conn.fetchrow(
        """SELECT status, currency, max_tickets_per_order, sale_starts_at > now() AS too_early,
                  ends_at <= now() AS over
           FROM events WHERE id = $1""",
        event_id,
    )
    if row is None or row["status"] == "draft":
        raise ApiError("not_found", "No such event.")
    if row["status"] != "published" or row["over"]:
        raise ApiError("conflict", f"The event is {row['status']}; nothing is on sale.")
    if row["too_early"]:
        raise ApiError("conflict", "The sale has not started yet.")
    return row


def not_seats_of_event(unknown: list[str]) -> ApiError:
    """422: seat ids that are not seats of the event."""
    return ApiError(
        "validation_error",
        "seat_ids: not seats of this event",
        {"fields": [{"field": "seat_ids", "message": "unknown seat"}], "seat_ids": unknown},
    )


def over_order_limit(limit: int, by_seats: bool) -> ApiError:
    """422: more tickets in one order than the event allows."""
    field = "seat_ids" if by_seats else "quantity"
    return ApiError(
        "validation_error",
        f"At most {limit} tickets per order for this event.",
        {"fields": [{"field": field, "message": f"more than {limit}"}]},
    )


def over_person_limit(limit: int, already: int) -> ApiError:
    """409: what the person holds or bought for the event would pass the limit."""
    return ApiError(
        "conflict",
        f"At most {limit} tickets per person for this event; you have {already}.",
        {"limit": limit, "held_or_bought": already},
    )


async def create(
    conn: Connection,
    *,
    user_id: str,
    event_id: str,
    seat_ids: list[str],
    ticket_type_id: str | None,
    quantity: int,
    ttl: int,
) -> Hold:
    """Create a hold (the caller owns the transaction); all-or-nothing."""
    event = await event_for_sale(conn, event_id)
    limit = event["max_tickets_per_order"]
    if quantity > limit:
        raise over_order_limit(limit, bool(seat_ids))
    already = (await tickets_per_person(conn, event_id, [user_id]))[user_id]
    if already + quantity > limit:
        raise over_person_limit(limit, already)
    hold_id = str(uuid.uuid4())
    expires_at = await conn.fetchval("SELECT now() + make_interval(secs => $1)", ttl)
    if seat_ids:
        items, changes = await claim_seats(conn, event_id, seat_ids, hold_id, expires_at)
        await outbox.seat_changes(conn, event_id, changes)
    else:
        assert ticket_type_id is not None
        items = await claim_units(conn, event_id, ticket_type_id, quantity)
    amount = sum(i.price_cents for i in items)
    await conn.execute(
        """INSERT INTO holds (id, event_id, user_id, ticket_type_id, seat_ids, quantity,
                              amount_cents, currency, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        hold_id,
        event_id,
        user_id,
        ticket_type_id,
        seat_ids,
        quantity,
        amount,
        event["currency"],
        expires_at,
    )
    return Hold(
        id=hold_id,
        event_id=event_id,
        seat_ids=sorted(seat_ids),
        ticket_type_id=ticket_type_id,
        quantity=quantity,
        amount_cents=amount,
        currency=event["currency"],
        expires_at=expires_at,
    )


async def get(conn: Connection, hold_id: str, user_id: str) -> Hold | None:
    row = await conn.fetchrow(
        f"SELECT {HOLD} FROM holds WHERE id = $1 AND user_id = $2 AND status = 'active'",
        hold_id,
        user_id,
    )
    return Hold(**dict(row)) if row else None


async def release(conn: Connection, hold_id: str, status: str = "released") -> str | None:
    """Give a hold's seats or units back; returns its event id, None when it was not active."""
    events = await release_many(conn, [hold_id], status)
    return events[0] if events else None


async def release_many(
    conn: Connection, hold_ids: list[str], status: str = "released"
) -> list[str]:
    """Give active holds' seats and units back, in a few statements for all; returns the events
    that changed. Locks follow the one order (holds, ticket types, seats: each by id).

    Only seats still held by these holds are released: an expired hold's seat may belong to
    someone else by now.
    """
    if not hold_ids:
        return []
    released = await conn.fetch(
        """WITH locked AS (
               SELECT id FROM holds WHERE id = ANY ($1::uuid[]) AND status = 'active'
               ORDER BY id FOR UPDATE)
           UPDATE holds h SET status = $2 FROM locked WHERE h.id = locked.id
           RETURNING h.id::text, h.event_id::text, h.ticket_type_id::text, h.quantity""",
        hold_ids,
        status,
    )
    if not released:
        return []
    units: dict[str, int] = defaultdict(int)
    for hold in released:
        if hold["ticket_type_id"]:
            units[hold["ticket_type_id"]] += hold["quantity"]
    rows: list[outbox.Row] = []
    if units:
        await conn.execute(
            """WITH locked AS (
                   SELECT id FROM ticket_types WHERE id = ANY ($1::uuid[])
                   ORDER BY id FOR UPDATE)
               UPDATE ticket_types t SET held = t.held - u.n, version = nextval('catalog_version')
               FROM unnest($1::uuid[], $2::int[]) AS u(id, n), locked
               WHERE t.id = u.id AND locked.id = u.id""",
            list(units),
            list(units.values()),
        )
    seat_holds = [h["id"] for h in released if not h["ticket_type_id"]]
    if seat_holds:
        freed = await conn.fetch(
            """WITH locked AS (
                   SELECT event_id, seat_id FROM event_seats
                   WHERE hold_id = ANY ($1::uuid[]) AND status = 'held'
                   ORDER BY seat_id FOR UPDATE)
               UPDATE event_seats es SET status = 'available', hold_id = NULL,
                      hold_expires_at = NULL, version = nextval('catalog_version')
               FROM locked
               WHERE es.event_id = locked.event_id AND es.seat_id = locked.seat_id
               RETURNING es.event_id::text, es.seat_id::text, es.version""",
            seat_holds,
        )
        by_event: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for seat in freed:
            by_event[seat["event_id"]].append((seat["seat_id"], "available", seat["version"]))
        for event_id, changes in by_event.items():
            rows += outbox.seat_rows(event_id, changes)
    events = sorted({h["event_id"] for h in released})
    rows += [
        ("catalog", {"event_id": e})
        for e in {h["event_id"] for h in released if h["ticket_type_id"]}
    ]
    await outbox.add_many(conn, rows)
    return events


async def sweep_expired(conn: Connection, limit: int = 500) -> list[str]:
    """Release holds whose time ran out; returns the events that changed."""
    ids = await conn.fetch(
        """SELECT id::text FROM holds WHERE status = 'active' AND expires_at <= now()
           ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED""",
        limit,
    )
    return await release_many(conn, [r["id"] for r in ids], "expired")
