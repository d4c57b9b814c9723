"""Events: creation with their seat inventory, changes, the status machine, search."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from bilten import cursors
from bilten.db import Connection
from bilten.errors import ApiError

ENDS_AFTER_START = "events_ends_after_start"
SALE_BEFORE_END = "events_sale_before_end"

# Which statuses each transition may start from.
TRANSITIONS = {
    "published": ("draft",),
    "cancelled": ("draft", "published"),
}
EDITABLE = ("draft", "published")


class PriceTier(msgspec.Struct, kw_only=True):
    id: str
    name: str
    price_cents: int
    sections: list[str]


class TicketType(msgspec.Struct, kw_only=True):
    id: str
    name: str
    price_cents: int
    capacity: int
    remaining: int


class EventSummary(msgspec.Struct, kw_only=True):
    id: str
    organizer_id: str
    venue_id: str
    title: str
    category: str
    city: str
    starts_at: datetime
    ends_at: datetime
    currency: str
    status: str
    image_url: str | None
    min_price_cents: int
    max_price_cents: int


class Event(EventSummary, kw_only=True):
    description: str
    sale_starts_at: datetime | None
    max_tickets_per_order: int
    created_at: datetime
    updated_at: datetime
    price_tiers: list[PriceTier]
    ticket_types: list[TicketType]
    seat_count: int
    available_seats: int


SUMMARY = """e.id::text, e.organizer_id::text, e.venue_id::text, e.title, e.category, e.city,
    e.starts_at, e.ends_at, e.currency, e.status, e.image_url, e.min_price_cents,
    e.max_price_cents"""
DETAIL = (
    SUMMARY
    + """, e.description, e.sale_starts_at, e.max_tickets_per_order,
    e.created_at, e.updated_at"""
)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(
        "validation_error",
        f"{field}: {message}",
        {"fields": [{"field": field, "message": message}]},
    )


def _check_times(fields: dict[str, Any]) -> None:
    starts, ends, sale = (
        fields.get("starts_at"),
        fields.get("ends_at"),
        fields.get("sale_starts_at"),
    )
    if starts and ends and ends <= starts:
        raise invalid("ends_at", "must be after starts_at")
    if sale and ends and sale >= ends:
        raise invalid("sale_starts_at", "must be before ends_at")


async def create(conn: Connection, organizer_id: str, venue_id: str, body: dict[str, Any]) -> str:
    """Create a draft event and materialise its seat inventory from the venue; returns its id.

    Each price tier names venue sections; a section belongs to at most one tier, and sections in
    no tier are not on sale. The caller owns the transaction.
    """
    _check_times(body)
    tiers = body.get("price_tiers") or []
    ticket_types = body.get("ticket_types") or []
    if not tiers and not ticket_types:
        raise invalid("price_tiers", "an event needs a price tier or a ticket type")
    for field, items in (("price_tiers", tiers), ("ticket_types", ticket_types)):
        names = [item["name"] for item in items]
        if len(set(names)) != len(names):
            raise invalid(field, "names must be unique")
    venue = await conn.fetchrow("SELECT city FROM venues WHERE id = $1", venue_id)
    sections = {
        r["name"]
        for r in await conn.fetch("SELECT name FROM sections WHERE venue_id = $1", venue_id)
    }
    claimed: set[str] = set()
    for tier in tiers:
        unknown = sorted(set(tier["sections"]) - sections)
        if unknown:
            raise invalid("price_tiers", f"no section named {', '.join(unknown)} at this venue")
        twice = claimed & set(tier["sections"])
        if twice:
            raise invalid("price_tiers", f"section {', '.join(sorted(twice))} is in two tiers")
        claimed |= set(tier["sections"])
    prices = [t["price_cents"] for t in (*tiers, *ticket_types)]
    event_id: str = await conn.fetchval(
        """INSERT INTO events (organizer_id, venue_id, title, description, category, city,
               starts_at, ends_at, currency, sale_starts_at, max_tickets_per_order,
               min_price_cents, max_price_cents)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id::text""",
        organizer_id,
        venue_id,
        body["title"],
        body.get("description") or "",
        body["category"],
        venue["city"],
        body["starts_at"],
        body["ends_at"],
        body["currency"],
        body.get("sale_starts_at"),
        body.get("max_tickets_per_order") or 10,
        min(prices),
        max(prices),
    )
    if tiers:
        await conn.execute(
            """INSERT INTO price_tiers (event_id, name, price_cents, sections)
               SELECT $1, t.name, t.price,
                      ARRAY(SELECT jsonb_array_elements_text(t.sections::jsonb))
               FROM unnest($2::text[], $3::int[], $4::text[]) AS t(name, price, sections)""",
            event_id,
            [t["name"] for t in tiers],
            [t["price_cents"] for t in tiers],
            # Each tier's section list as a JSON text: arrays of arrays must be rectangular.
            [msgspec.json.encode(t["sections"]).decode() for t in tiers],
        )
        # The whole inventory in one set-based statement.
        await conn.execute(
            """INSERT INTO event_seats (event_id, seat_id, tier_id)
               SELECT $1, s.id, t.id
               FROM price_tiers t
               JOIN sections sec ON sec.venue_id = $2 AND sec.name = ANY (t.sections)
               JOIN seats s ON s.section_id = sec.id
               WHERE t.event_id = $1""",
            event_id,
            venue_id,
        )
    if ticket_types:
        await conn.execute(
            """INSERT INTO ticket_types (event_id, name, price_cents, capacity)
               SELECT $1, * FROM unnest($2::text[], $3::int[], $4::int[])""",
            event_id,
            [t["name"] for t in ticket_types],
            [t["price_cents"] for t in ticket_types],
            [t["capacity"] for t in ticket_types],
        )
    return event_id


async def get(conn: Connection, event_id: str) -> Event | None:
    row = await conn.fetchrow(f"SELECT {DETAIL} FROM events e WHERE e.id = $1", event_id)
    if row is None:
        return None
    tiers = await conn.fetch(
        """SELECT id::text, name, price_cents, sections FROM price_tiers
           WHERE event_id = $1 ORDER BY price_cents DESC, name""",
        event_id,
    )
    types = await conn.fetch(
        """SELECT id::text, name, price_cents, capacity, capacity - sold - held AS remaining
           FROM ticket_types WHERE event_id = $1 ORDER BY price_cents DESC, name""",
        event_id,
    )
    seats = await conn.fetchrow(
        """SELECT count(*) AS total,
                  count(*) FILTER (WHERE status = 'available'
                                   OR (status = 'held' AND hold_expires_at <= now())) AS available
           FROM event_seats WHERE event_id = $1""",
        event_id,
    )
    return Event(
        **dict(row),
        price_tiers=[PriceTier(**dict(t)) for t in tiers],
        ticket_types=[TicketType(**dict(t)) for t in types],
        seat_count=seats["total"],
        available_seats=seats["available"],
    )


async def owner_and_status(conn: Connection, event_id: str) -> tuple[str, str] | None:
    row = await conn.fetchrow(
        "SELECT organizer_id::text, status FROM events WHERE id = $1", event_id
    )
    return (row["organizer_id"], row["status"]) if row else None


async def update(conn: Connection, event_id: str, changes: dict[str, Any]) -> bool:
    """Apply changes to an editable event; False when its status forbids edits."""
    if not changes:  # nothing to change, but the answer is the same as for a change
        editable = await conn.fetchval(
            "SELECT status = ANY ($2::text[]) FROM events WHERE id = $1", event_id, list(EDITABLE)
        )
        return bool(editable)
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(changes, start=3))
    try:
        status = await conn.execute(
            f"""UPDATE events SET {sets}, updated_at = now(), version = nextval('catalog_version')
                WHERE id = $1 AND status = ANY ($2::text[])""",
            event_id,
            list(EDITABLE),
            *changes.values(),
        )
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name == ENDS_AFTER_START:
            raise invalid("ends_at", "must be after starts_at") from None
        if exc.constraint_name == SALE_BEFORE_END:
            raise invalid("sale_starts_at", "must be before ends_at") from None
        raise
    return bool(status == "UPDATE 1")


async def transition(conn: Connection, event_id: str, to: str) -> str | None:
    """Move the event to status ``to``; returns the status it had if the move was illegal."""
    moved = await conn.fetchval(
        """UPDATE events SET status = $2, updated_at = now(), version = nextval('catalog_version')
           WHERE id = $1 AND status = ANY ($3::text[]) RETURNING status""",
        event_id,
        to,
        list(TRANSITIONS[to]),
    )
    if moved:
        return None
    current: str | None = await conn.fetchval("SELECT status FROM events WHERE id = $1", event_id)
    return current


async def set_image(conn: Connection, event_id: str, url: str) -> None:
    await conn.execute(
        """UPDATE events SET image_url = $2, updated_at = now(),
                  version = nextval('catalog_version') WHERE id = $1""",
        event_id,
        url,
    )


# --- search ---------------------------------------------------------------------------------


async def search(
    conn: Connection,
    *,
    q: str | None = None,
    category: str | None = None,
    city: str | None = None,
    starts_from: datetime | None = None,
    starts_to: datetime | None = None,
    min_price: int | None = None,
    max_price: int | None = None,
    viewer_id: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> tuple[list[EventSummary], str | None]:
    """Published events (and the viewer's own drafts) in start order, one keyset page at a time.

    The page boundary is the last (starts_at, id) seen, so inserts between pages never make an
    event appear twice or be skipped.
    """
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if viewer_id:
        where.append(
            f"(e.status = 'published' OR (e.organizer_id = {arg(viewer_id)} "
            "AND e.status = 'draft'))"
        )
    else:
        where.append("e.status = 'published'")
    if q:
        where.append(f"e.search @@ websearch_to_tsquery('english', {arg(q)})")
    if category:
        where.append(f"lower(e.category) = lower({arg(category)})")
    if city:
        where.append(f"lower(e.city) = lower({arg(city)})")
    if starts_from:
        where.append(f"e.starts_at >= {arg(starts_from)}")
    if starts_to:
        where.append(f"e.starts_at < {arg(starts_to)}")
    if min_price is not None:
        where.append(f"e.max_price_cents >= {arg(min_price)}")
    if max_price is not None:
        where.append(f"e.min_price_cents <= {arg(max_price)}")
    if cursor:
        after_start, after_id = cursors.decode(cursor)
        where.append(f"(e.starts_at, e.id) > ({arg(after_start)}, {arg(after_id)})")
    rows = await conn.fetch(
        f"""SELECT {SUMMARY} FROM events e WHERE {" AND ".join(where)}
            ORDER BY e.starts_at, e.id LIMIT {arg(limit + 1)}""",
        *args,
    )
    items = [EventSummary(**dict(r)) for r in rows[:limit]]
    next_cursor = (
        cursors.encode(items[-1].starts_at, items[-1].id) if len(rows) > limit and items else None
    )
    return items, next_cursor


# --- an organizer's own events --------------------------------------------------------------


class OwnEvent(EventSummary, kw_only=True):
    created_at: datetime


_OWN = f"""SELECT {SUMMARY}, e.created_at FROM events e
    WHERE e.organizer_id = $1 AND ($2::text IS NULL OR e.status = $2)
      AND ($3::timestamptz IS NULL OR (e.created_at, e.id) < ($3, $4::uuid))
    ORDER BY e.created_at DESC, e.id DESC LIMIT $5"""


async def list_own(
    conn: Connection, organizer_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[OwnEvent], str | None]:
    """The organizer's events in every status (drafts too), newest first, a keyset page at a
    time: the cursor is the last ``(created_at, id)`` seen."""
    after = cursors.decode(cursor) if cursor else None
    rows = await conn.fetch(
        _OWN,
        organizer_id,
        status,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    items = [OwnEvent(**dict(r)) for r in rows[:limit]]
    next_cursor = (
        cursors.encode(items[-1].created_at, items[-1].id) if len(rows) > limit and items else None
    )
    return items, next_cursor
