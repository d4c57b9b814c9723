"""``bilten seed-demo``: an organizer, a venue and a published event to click around in.

The venue has 464 seats in four sections (three side by side, a balcony behind) at three price
tiers, and the event sells 300 standing tickets too. ``make run`` seeds it (``bilten dev
--seed-demo``), so the web app opens onto something to look at.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bilten import events, passwords, users, venues
from bilten.db import Connection
from bilten.settings import Settings

EMAIL = "demo@bilten.test"
PASSWORD = "demo password"
TITLE = "Bilten Demo Night"


def _rows(labels: str, seats: int) -> list[dict[str, object]]:
    return [{"label": label, "seats": seats} for label in labels]


async def seed(conn: Connection, settings: Settings) -> tuple[str, bool]:
    """The demo event's id, and whether it was created now (a second run reuses it)."""
    found = await users.credentials(conn, EMAIL)
    async with conn.transaction():
        if found is None:
            organizer = await users.create(
                conn,
                email=EMAIL,
                password_hash=await passwords.from_settings(settings).hash(PASSWORD),
                name="Demo Organizer",
                role="organizer",
            )
        else:
            organizer = found[0]
        existing: str | None = await conn.fetchval(
            "SELECT id::text FROM events WHERE organizer_id = $1 AND title = $2",
            organizer.id,
            TITLE,
        )
        if existing:
            return existing, False
        venue_id = await venues.create(
            conn,
            organizer.id,
            {
                "name": "Demo Hall",
                "address": "1 Example Street",
                "city": "Oslo",
                "country": "NO",
                "timezone": "Europe/Oslo",
                "sections": [
                    {"name": "Left", "x": 0, "y": 0, "rows": _rows("ABCDEFGHIJ", 8)},
                    {"name": "Centre", "x": 10, "y": 0, "rows": _rows("ABCDEFGHIJ", 16)},
                    {"name": "Right", "x": 28, "y": 0, "rows": _rows("ABCDEFGHIJ", 8)},
                    {"name": "Balcony", "x": 6, "y": 13, "rows": _rows("KLMNOP", 24)},
                ],
            },
        )
        starts = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
        event_id = await events.create(
            conn,
            organizer.id,
            venue_id,
            {
                "title": TITLE,
                "description": "An evening of demo music, to try Bilten's seat map and booking.",
                "category": "concert",
                "starts_at": starts,
                "ends_at": starts + timedelta(hours=3),
                "currency": "EUR",
                "max_tickets_per_order": 8,
                "price_tiers": [
                    {"name": "Premium", "price_cents": 6500, "sections": ["Centre"]},
                    {"name": "Stalls", "price_cents": 4500, "sections": ["Left", "Right"]},
                    {"name": "Balcony", "price_cents": 2500, "sections": ["Balcony"]},
                ],
                "ticket_types": [{"name": "Standing", "price_cents": 1500, "capacity": 300}],
            },
        )
        await events.transition(conn, event_id, "published")
    return event_id, True
