"""Tickets: reads, visibility, and check-in."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from bilten import cursors
from bilten.db import Connection


class Ticket(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    booking_id: str
    event_id: str
    label: str
    code: str
    status: Literal["valid", "checked_in", "void"]
    checked_in_at: datetime | None = None


# A ticket of a cancelled event is void whatever its row says (its booking's cancellation may
# still be on its way).
TICKET = """t.id::text, t.booking_id::text, t.event_id::text, t.label, t.code,
            CASE WHEN e.status = 'cancelled' THEN 'void' ELSE t.status END AS status,
            t.checked_in_at"""


async def get(conn: Connection, ticket_id: str) -> tuple[Ticket, str, str] | None:
    """The ticket, its holder's id and its event's organizer's id."""
    row = await conn.fetchrow(
        f"""SELECT {TICKET}, t.user_id::text AS holder, e.organizer_id::text AS organizer
            FROM tickets t JOIN events e ON e.id = t.event_id WHERE t.id = $1""",
        ticket_id,
    )
    if row is None:
        return None
    fields = {k: row[k] for k in Ticket.__struct_fields__}
    return Ticket(**fields), row["holder"], row["organizer"]


async def list_for(
    conn: Connection, user_id: str, limit: int, cursor: str | None
) -> tuple[list[Ticket], str | None]:
    after = cursors.decode(cursor) if cursor else None
    rows = await conn.fetch(
        f"""SELECT {TICKET}, t.created_at FROM tickets t JOIN events e ON e.id = t.event_id
            WHERE t.user_id = $1
              AND ($2::timestamptz IS NULL OR (t.created_at, t.id) < ($2, $3::uuid))
            ORDER BY t.created_at DESC, t.id DESC LIMIT $4""",
        user_id,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    page = rows[:limit]
    items = [Ticket(**{k: r[k] for k in Ticket.__struct_fields__}) for r in page]
    next_cursor = None
    if len(rows) > limit and page:
        last = page[-1]
        next_cursor = cursors.encode(last["created_at"], last["id"])
    return items, next_cursor


async def check_in(conn: Connection, ticket_id: str, event_id: str) -> Any:
    """Mark a valid ticket checked in, in one statement; None when it was not valid."""
    return await conn.fetchrow(
        f"""UPDATE tickets t SET status = 'checked_in', checked_in_at = now()
            FROM events e
            WHERE t.id = $1 AND t.event_id = $2 AND t.status = 'valid'
              AND e.id = t.event_id AND e.status <> 'cancelled'
            RETURNING {TICKET}""",
        ticket_id,
        event_id,
    )
