"""Venues and their seat layout: sections, rows and numbered seats with drawing coordinates."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from bilten import cursors
from bilten.db import Connection
from bilten.errors import ApiError

SEAT_SPACING = 1.0
ROW_SPACING = 1.0
SECTION_GAP = 2.0
MAX_SEATS = 100_000


class RowLayout(msgspec.Struct, kw_only=True):
    label: str
    seats: int


class SectionLayout(msgspec.Struct, kw_only=True):
    id: str
    name: str
    x: float
    y: float
    rows: list[RowLayout]


def layout(sections: list[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Section rows ``(position, name, x, y)`` and seat rows ``(section position, row label,
    row index, number, label, x, y)``.

    Sections without coordinates are stacked top to bottom, each below the previous one; seats
    sit one unit apart along their row and rows one unit apart, centred on the widest row.
    """
    section_rows = []
    seat_rows = []
    next_y = 0.0
    for position, section in enumerate(sections):
        rows = section["rows"]
        widest = max((row["seats"] for row in rows), default=0)
        x = section.get("x")
        y = section.get("y")
        x = 0.0 if x is None else float(x)
        y = next_y if y is None else float(y)
        section_rows.append((position, section["name"], x, y))
        for row_index, row in enumerate(rows):
            offset = (widest - row["seats"]) * SEAT_SPACING / 2
            for number in range(1, row["seats"] + 1):
                seat_rows.append(
                    (
                        position,
                        row["label"],
                        row_index,
                        number,
                        f"{section['name']} {row['label']}{number}",
                        x + offset + (number - 1) * SEAT_SPACING,
                        y + row_index * ROW_SPACING,
                    )
                )
        next_y = max(next_y, y + len(rows) * ROW_SPACING + SECTION_GAP)
    return section_rows, seat_rows


async def create(conn: Connection, owner_id: str, fields: dict[str, Any]) -> str:
    """Create a venue with its whole layout in set-based statements; returns its id."""
    sections = fields["sections"]
    names = [s["name"] for s in sections]
    if len(set(names)) != len(names):
        raise ApiError(
            "validation_error",
            "Section names must be unique within a venue.",
            {"fields": [{"field": "sections", "message": "duplicate section name"}]},
        )
    for s in sections:
        labels = [r["label"] for r in s["rows"]]
        if len(set(labels)) != len(labels):
            raise ApiError(
                "validation_error",
                f"Row labels must be unique within section {s['name']!r}.",
                {"fields": [{"field": "sections.rows", "message": "duplicate row label"}]},
            )
    # Counted before the layout is built: a small body can describe millions of seats.
    if sum(row["seats"] for s in sections for row in s["rows"]) > MAX_SEATS:
        raise ApiError(
            "validation_error",
            f"A venue has at most {MAX_SEATS} seats.",
            {"fields": [{"field": "sections", "message": "too many seats"}]},
        )
    section_rows, seat_rows = layout(sections)
    async with conn.transaction():
        venue_id: str = await conn.fetchval(
            """INSERT INTO venues (owner_id, name, address, city, country, timezone, seat_count)
               VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id::text""",
            owner_id,
            fields["name"],
            fields["address"],
            fields["city"],
            fields["country"],
            fields["timezone"],
            len(seat_rows),
        )
        section_ids = await conn.fetch(
            """INSERT INTO sections (venue_id, position, name, x, y)
               SELECT $1, * FROM unnest($2::int[], $3::text[], $4::real[], $5::real[])
               RETURNING id, position""",
            venue_id,
            *map(list, zip(*section_rows, strict=True)),
        )
        by_position = {r["position"]: r["id"] for r in section_ids}
        if seat_rows:
            columns = list(zip(*seat_rows, strict=True))
            await conn.execute(
                """INSERT INTO seats
                       (venue_id, section_id, row_label, row_index, number, label, x, y)
                   SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::int[], $5::int[],
                                            $6::text[], $7::real[], $8::real[])""",
                venue_id,
                [by_position[p] for p in columns[0]],
                *map(list, columns[1:]),
            )
    return venue_id


async def get(conn: Connection, venue_id: str) -> Venue | None:
    row = await conn.fetchrow(
        """SELECT id::text, owner_id::text, name, address, city, country, timezone, seat_count,
                  created_at FROM venues WHERE id = $1""",
        venue_id,
    )
    if row is None:
        return None
    rows = await conn.fetch(
        """SELECT s.id::text AS id, s.name, s.x, s.y, t.row_label, count(*) AS seats
           FROM sections s JOIN seats t ON t.section_id = s.id
           WHERE s.venue_id = $1
           GROUP BY s.id, s.position, t.row_label, t.row_index
           ORDER BY s.position, t.row_index""",
        venue_id,
    )
    sections: dict[str, SectionLayout] = {}
    for r in rows:
        section = sections.get(r["id"])
        if section is None:
            section = sections[r["id"]] = SectionLayout(
                id=r["id"], name=r["name"], x=r["x"], y=r["y"], rows=[]
            )
        section.rows.append(RowLayout(label=r["row_label"], seats=r["seats"]))
    return Venue(**dict(row), sections=list(sections.values()))


async def owner_of(conn: Connection, venue_id: str) -> str | None:
    try:
        owner: str | None = await conn.fetchval(
            "SELECT owner_id::text FROM venues WHERE id = $1", venue_id
        )
    except asyncpg.DataError:
        return None
    return owner


class VenueSummary(msgspec.Struct, kw_only=True):
    """A venue without its layout, for lists."""

    id: str
    owner_id: str
    name: str
    address: str
    city: str
    country: str
    timezone: str
    seat_count: int
    created_at: datetime


class Venue(VenueSummary, kw_only=True):
    sections: list[SectionLayout]


_OWN = """SELECT id::text, owner_id::text, name, address, city, country, timezone, seat_count,
           created_at FROM venues
    WHERE owner_id = $1
      AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid))
    ORDER BY created_at DESC, id DESC LIMIT $4"""


async def list_own(
    conn: Connection, owner_id: str, limit: int, cursor: str | None
) -> tuple[list[VenueSummary], str | None]:
    """The owner's venues, newest first, a keyset page at a time (the last ``(created_at, id)``
    seen is the cursor)."""
    after = cursors.decode(cursor) if cursor else None
    rows = await conn.fetch(
        _OWN, owner_id, after[0] if after else None, after[1] if after else None, limit + 1
    )
    items = [VenueSummary(**dict(r)) for r in rows[:limit]]
    next_cursor = (
        cursors.encode(items[-1].created_at, items[-1].id) if len(rows) > limit and items else None
    )
    return items, next_cursor
