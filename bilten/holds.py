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
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

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


def seats_of_holds(holds: str) -> str:
    """A condition on ``event_seats es``: the seat is one of the holds ``holds`` (an SQL
    parameter, a uuid array) and is still held by it. The seats are found through the holds' own
    seat lists, by primary key: event_seats has no index on hold_id, so that its updates stay
    HOT (migration 0015)."""
    return (
        f"(es.event_id, es.seat_id) IN (SELECT h.event_id, unnest(h.seat_ids) FROM holds h "
        f"WHERE h.id = ANY ({holds}::uuid[])) AND es.hold_id = ANY ({holds}::uuid[])"
    )


def seat_unavailable(seat_ids: list[str]) -> ApiError:
    return ApiError(
        "seat_unavailable", "A requested seat is held or sold.", {"seat_ids": sorted(seat_ids)}
    )


async def tickets_per_person(
    conn: Connection, event_id: str, user_ids: list[str]
) -> dict[str, int]:
    """What each user already holds, is paying for (bookings that hold their own seats or units)
    or bought for the event, for the per-person limit. Their
    checks are locked until the transaction ends (an advisory lock per user and event, taken in
    key order): one user's parallel requests cannot pass the limit together."""
    users = sorted(set(user_ids))
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest($1::text[]) AS k ORDER BY k",
        [f"{user}:{event_id}" for user in users],
    )
    # A user's tickets and bookings are read through the user's index alone: the subqueries
    # fenced by OFFSET 0 keep the event's condition out of the index scan, which the planner
    # would otherwise combine with an index on the event (or on unfinished bookings) and so
    # read the whole sale for each buyer (its statistics lag behind a fresh sale).
    counts = await conn.fetch(
        """SELECT u.id::text AS user_id,
                  coalesce((SELECT sum(quantity) FROM holds h WHERE h.user_id = u.id
                            AND h.event_id = $2 AND h.status = 'active'
                            AND h.expires_at > now()), 0)
                + (SELECT count(*)
                   FROM (SELECT event_id, status FROM tickets WHERE user_id = u.id OFFSET 0) t
                   WHERE t.event_id = $2 AND t.status <> 'void')
                + (SELECT count(*)
                   FROM (SELECT id, event_id, hold_id, saga_state FROM bookings
                         WHERE user_id = u.id OFFSET 0) b
                   JOIN booking_items i ON i.booking_id = b.id
                   WHERE b.event_id = $2 AND b.hold_id IS NULL
                     AND b.saga_state = 'PAYMENT_PENDING') AS n
           FROM unnest($1::uuid[]) AS u(id)""",
        users,
        event_id,
    )
    return {r["user_id"]: int(r["n"]) for r in counts}


async def reclaim_units(conn: Connection, event_id: str, ticket_type_id: str) -> Any:
    """A ticket type's row (``name``, ``price_cents``, units ``remaining``) after its expired
    unit holds gave their units back, locked until the transaction ends; None when it is not a
    ticket type of the event."""
    return await conn.fetchrow(_RECLAIM_UNITS, ticket_type_id, event_id)


def too_few_units(kind: Any, ticket_type_id: str, left: int) -> ApiError:
    """409: fewer units left of a ticket type (its :func:`reclaim_units` row) than asked."""
    return ApiError(
        "sold_out",
        f"Only {left} left of {kind['name']}.",
        {"ticket_type_id": ticket_type_id, "remaining": left},
    )


def unit_items(kind: Any, ticket_type_id: str, quantity: int) -> list[Item]:
    item = Item(ticket_type_id=ticket_type_id, label=kind["name"], price_cents=kind["price_cents"])
    return [item] * quantity


async def take_units(conn: Connection, ticket_type_id: str, quantity: int) -> None:
    """Hold ``quantity`` units the caller counted on its :func:`reclaim_units` row, which is
    locked since: they are there."""
    held = await conn.fetchval(_CLAIM_UNITS, ticket_type_id, quantity)
    assert held is not None


async def event_for_sale(conn: Connection, event_id: str) -> Any:
    """The event's currency and per-order limit when it is on sale; an API error otherwise."""
    row = await conn.fetchrow(
        """SELECT status, currency, max_tickets_per_order, sale_starts_at > now() AS too_early,
                  ends_at <= now() AS over
           FROM events WHERE id = $1""",
        event_id,
    )
    return on_sale(row)


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


@dataclass(frozen=True)
class Want:
    """One request for a hold: seats, or a quantity of a ticket type."""

    user_id: str
    event_id: str
    seat_ids: list[str]
    ticket_type_id: str | None
    quantity: int


Outcome = Hold | ApiError

_EVENTS = """
SELECT id::text, status, currency, max_tickets_per_order, sale_starts_at > now() AS too_early,
       ends_at <= now() AS over, now() + make_interval(secs => $2) AS expires_at
FROM events WHERE id = ANY ($1::uuid[])
"""

# Every seat any request of the batch wants, locked in one order (seat, then event).
_LOCK_SEATS = """
SELECT es.event_id::text, es.seat_id::text,
       es.status = 'available' OR (es.status = 'held' AND es.hold_expires_at <= now()) AS free
FROM event_seats es JOIN unnest($1::uuid[], $2::uuid[]) AS w(event_id, seat_id)
  ON es.event_id = w.event_id AND es.seat_id = w.seat_id
WHERE es.event_id = ANY ($1::uuid[]) AND es.seat_id = ANY ($2::uuid[])
ORDER BY es.seat_id, es.event_id
FOR UPDATE OF es
"""

_TAKE_SEATS = """
UPDATE event_seats es
SET status = 'held', hold_id = w.hold_id, hold_expires_at = w.expires_at, booking_id = NULL,
    version = nextval('catalog_version')
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[])
     AS w(event_id, seat_id, hold_id, expires_at)
WHERE es.event_id = ANY ($1::uuid[]) AND es.seat_id = ANY ($2::uuid[])
  AND es.event_id = w.event_id AND es.seat_id = w.seat_id
RETURNING es.event_id::text, es.seat_id::text, es.hold_id::text, es.version,
          (SELECT label FROM seats WHERE id = es.seat_id) AS label,
          (SELECT price_cents FROM price_tiers WHERE id = es.tier_id) AS price_cents
"""

_INSERT_HOLDS = """
INSERT INTO holds (id, event_id, user_id, ticket_type_id, seat_ids, quantity, amount_cents,
                   currency, expires_at)
SELECT w.id, w.event_id, w.user_id, w.ticket_type_id,
       string_to_array(w.seats, ',')::uuid[],
       w.quantity, w.amount, w.currency, w.expires_at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::int[], $7::int[],
            $8::text[], $9::timestamptz[])
     AS w(id, event_id, user_id, ticket_type_id, seats, quantity, amount, currency, expires_at)
"""


# Seats of the wanted ones that are taken now, read without locks: only for events on sale and
# orders within the event's limit, so that those refusals keep their precedence.
_TAKEN_NOW = """
SELECT w.n, w.seat_id::text
FROM unnest($1::int[], $2::uuid[], $3::uuid[], $4::int[]) AS w(n, event_id, seat_id, quantity)
JOIN event_seats es ON es.event_id = w.event_id AND es.seat_id = w.seat_id
JOIN events e ON e.id = w.event_id
WHERE es.event_id = ANY ($2::uuid[]) AND es.seat_id = ANY ($3::uuid[])
  AND e.status = 'published'
  AND NOT coalesce(e.sale_starts_at > now() OR e.ends_at <= now(), false)
  AND w.quantity <= e.max_tickets_per_order
  AND NOT (es.status = 'available' OR (es.status = 'held' AND es.hold_expires_at <= now()))
"""


async def refuse_taken(conn: Connection, wants: list[Want]) -> dict[int, ApiError]:
    """The requests (by index) that want a seat taken at this moment, each with its refusal.

    One read of committed rows, outside any transaction and without a lock: a seat it sees held
    or sold was taken while the request was in flight, so refusing is the answer the locking
    path would give, and a click on a taken seat never waits for a lock or writes a row. A
    seat it sees free may still be lost, which the locking path then decides.
    """
    pairs = [(n, w, s) for n, w in enumerate(wants) for s in w.seat_ids]
    if not pairs:
        return {}
    rows = await conn.fetch(
        _TAKEN_NOW,
        [n for n, _, _ in pairs],
        [w.event_id for _, w, _ in pairs],
        [s for _, _, s in pairs],
        [w.quantity for _, w, _ in pairs],
    )
    taken: dict[int, list[str]] = defaultdict(list)
    for row in rows:
        taken[row["n"]].append(row["seat_id"])
    return {n: seat_unavailable(seats) for n, seats in taken.items()}


@dataclass
class _Left:
    """What a batch found when it locked everything, less what its earlier requests won."""

    events: dict[str, Any]  # event id -> its row (_EVENTS)
    counts: dict[tuple[str, str], int]  # (user, event) -> held or bought
    kinds: dict[tuple[str, str], Any]  # (ticket type, event) -> its row, None when unknown
    units: dict[tuple[str, str], int]  # (ticket type, event) -> units left
    free: set[tuple[str, str]]  # (event, seat) free
    known: set[tuple[str, str]]  # (event, seat) that exist


async def create_many(conn: Connection, wants: list[Want], ttl: int) -> list[Outcome]:
    """Holds for many requests in a few statements (the caller owns the transaction), each all
    or nothing on its own: a hold, or the API error that refused it. Requests are served in list
    order: when two want the same seat or the last units, or a person's limit has room for one
    of them, the earlier one gets it.

    Everything the batch may touch is locked first, in the one order (per-person locks, holds
    and ticket types with expired unit holds reclaimed, seats by seat then event); then each
    request is judged in turn against what is left; then the winners are written, one
    statement per table.
    """
    results: list[Outcome | None] = [None] * len(wants)
    events = {
        r["id"]: r for r in await conn.fetch(_EVENTS, sorted({w.event_id for w in wants}), ttl)
    }
    live: list[int] = []
    for n, want in enumerate(wants):
        try:
            event = on_sale(events.get(want.event_id))
            if want.quantity > event["max_tickets_per_order"]:
                raise over_order_limit(event["max_tickets_per_order"], bool(want.seat_ids))
        except ApiError as refused:
            results[n] = refused
        else:
            live.append(n)
    left = await _lock(conn, [wants[n] for n in live], events)
    made: list[int] = []
    for n in live:
        results[n] = _judge(wants[n], left)
        if results[n] is None:
            made.append(n)
    won = await _write(conn, [wants[n] for n in made], left)
    for n, hold in zip(made, won, strict=True):
        results[n] = hold
    return [cast(Outcome, r) for r in results]


async def _lock(conn: Connection, wants: list[Want], events: dict[str, Any]) -> _Left:
    """Lock and read what the requests may take: what each person holds or bought, the units
    left of each ticket type (expired unit holds reclaimed first), the seats free."""
    counts = await _held_or_bought(conn, [(w.user_id, w.event_id) for w in wants])
    kinds: dict[tuple[str, str], Any] = {}
    for type_id, event_id in sorted(
        {(str(w.ticket_type_id), w.event_id) for w in wants if not w.seat_ids}
    ):
        kinds[(type_id, event_id)] = await reclaim_units(conn, event_id, type_id)
    units = {k: kind["remaining"] for k, kind in kinds.items() if kind is not None}
    pairs = [(w.event_id, s) for w in wants for s in w.seat_ids]
    locked = await conn.fetch(_LOCK_SEATS, [e for e, _ in pairs], [s for _, s in pairs])
    free = {(r["event_id"], r["seat_id"]) for r in locked if r["free"]}
    known = {(r["event_id"], r["seat_id"]) for r in locked}
    return _Left(events, counts, kinds, units, free, known)


def _judge(want: Want, left: _Left) -> ApiError | None:
    """The refusal of one request against what is left, or None: then what it takes is taken
    from ``left``, so that later requests of the batch see it gone."""
    person = (want.user_id, want.event_id)
    limit = left.events[want.event_id]["max_tickets_per_order"]
    mine = [(want.event_id, s) for s in want.seat_ids]
    kind_key = (str(want.ticket_type_id), want.event_id)
    if left.counts[person] + want.quantity > limit:
        return over_person_limit(limit, left.counts[person])
    if want.seat_ids:
        unknown = [s for e, s in mine if (e, s) not in left.known]
        if unknown:
            return not_seats_of_event(unknown)
        if not all(p in left.free for p in mine):
            return seat_unavailable([s for e, s in mine if (e, s) not in left.free])
        left.free.difference_update(mine)
    elif left.kinds[kind_key] is None:
        return unknown_ticket_type()
    elif want.quantity > left.units[kind_key]:
        return too_few_units(left.kinds[kind_key], kind_key[0], left.units[kind_key])
    else:
        left.units[kind_key] -= want.quantity
    left.counts[person] += want.quantity
    return None


async def _write(conn: Connection, wants: list[Want], left: _Left) -> list[Hold]:
    """Write what the judged requests won: units, seats, hold rows and outbox rows, one
    statement per table. The rows are locked since :func:`_lock`: what it counted is there."""
    hold_ids = [str(uuid.uuid4()) for _ in wants]
    items: list[list[Item]] = [[] for _ in wants]
    for (type_id, event_id), kind in left.kinds.items():
        taken = 0 if kind is None else kind["remaining"] - left.units[(type_id, event_id)]
        if taken:
            await take_units(conn, type_id, taken)
    for n, want in enumerate(wants):
        kind = left.kinds.get((str(want.ticket_type_id), want.event_id))
        if not want.seat_ids and kind is not None:
            items[n] = unit_items(kind, str(want.ticket_type_id), want.quantity)
    taking = [(n, s) for n, want in enumerate(wants) for s in want.seat_ids]
    changes: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    if taking:
        taken_rows = await conn.fetch(
            _TAKE_SEATS,
            [wants[n].event_id for n, _ in taking],
            [s for _, s in taking],
            [hold_ids[n] for n, _ in taking],
            [left.events[wants[n].event_id]["expires_at"] for n, _ in taking],
        )
        by_hold = {hold_id: n for n, hold_id in enumerate(hold_ids)}
        for row in sorted(taken_rows, key=lambda r: r["label"]):
            items[by_hold[row["hold_id"]]].append(
                Item(seat_id=row["seat_id"], label=row["label"], price_cents=row["price_cents"])
            )
            changes[row["event_id"]].append((row["seat_id"], "held", row["version"]))
    made = [
        Hold(
            id=hold_ids[n],
            event_id=want.event_id,
            seat_ids=sorted(want.seat_ids),
            ticket_type_id=want.ticket_type_id,
            quantity=want.quantity,
            amount_cents=sum(i.price_cents for i in items[n]),
            currency=left.events[want.event_id]["currency"],
            expires_at=left.events[want.event_id]["expires_at"],
        )
        for n, want in enumerate(wants)
    ]
    if made:
        await conn.execute(
            _INSERT_HOLDS,
            [h.id for h in made],
            [h.event_id for h in made],
            [w.user_id for w in wants],
            [h.ticket_type_id for h in made],
            [",".join(h.seat_ids) for h in made],
            [h.quantity for h in made],
            [h.amount_cents for h in made],
            [h.currency for h in made],
            [h.expires_at for h in made],
        )
    rows: list[outbox.Row] = []
    for event_id, seat_changes in changes.items():
        rows += outbox.seat_rows(event_id, seat_changes)
    unit_events = {w.event_id for w in wants if not w.seat_ids}
    rows += [("catalog", {"event_id": e}) for e in sorted(unit_events)]
    await outbox.add_many(conn, rows)
    return made


def on_sale(row: Any) -> Any:
    """The event's row when it is on sale; an API error otherwise."""
    if row is None or row["status"] == "draft":
        raise ApiError("not_found", "No such event.")
    if row["status"] != "published" or row["over"]:
        raise ApiError("conflict", f"The event is {row['status']}; nothing is on sale.")
    if row["too_early"]:
        raise ApiError("conflict", "The sale has not started yet.")
    return row


async def _held_or_bought(
    conn: Connection, people: list[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """For (user, event) pairs: what each holds or bought, its per-person lock taken."""
    by_event: dict[str, list[str]] = defaultdict(list)
    for user, event in sorted(set(people)):
        by_event[event].append(user)
    counts: dict[tuple[str, str], int] = {}
    for event, users in sorted(by_event.items()):
        for user, n in (await tickets_per_person(conn, event, users)).items():
            counts[(user, event)] = n
    return counts


def unknown_ticket_type() -> ApiError:
    return ApiError(
        "validation_error",
        "ticket_type_id: not a ticket type of this event",
        {"fields": [{"field": "ticket_type_id", "message": "unknown ticket type"}]},
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
    await give_back_units(conn, units)
    seat_holds = [h["id"] for h in released if not h["ticket_type_id"]]
    if seat_holds:
        freed = await conn.fetch(
            f"""WITH locked AS (
                   SELECT es.event_id, es.seat_id FROM event_seats es
                   WHERE {seats_of_holds("$1")} AND es.status = 'held'
                   ORDER BY es.seat_id FOR UPDATE)
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


async def give_back_units(conn: Connection, units: dict[str, int]) -> None:
    """Held units given back: ``{ticket type id: how many}``, the types locked in id order (the
    one lock order)."""
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


async def sweep_expired(conn: Connection, limit: int = 500) -> list[str]:
    """Release holds whose time ran out; returns the events that changed."""
    ids = await conn.fetch(
        """SELECT id::text FROM holds WHERE status = 'active' AND expires_at <= now()
           ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED""",
        limit,
    )
    return await release_many(conn, [r["id"] for r in ids], "expired")
