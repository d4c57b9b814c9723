"""The catalog's read path against a hello-world served the same way.

    python bench/read_path.py [--duration 10] [--connections 64] [--seats 1000] [--json FILE]

Creates a published event with a 1,000-seat map, then measures with wrk, one after another:
a Starlette hello-world (the yardstick), `GET /events/{id}` (event detail, from the in-process
cache) and `GET /events/{id}/seats` (the encoded seat map, checked against the event's version
and served from cache), each from one `bilten serve` process. The general per-IP request budget
is measured separately: every request then costs a Redis round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import bilten, hello_world, report, services, wrk
from bench.http_ops import write_json
from bilten import db, events, users, venues


async def make_event(database_url: str, seats: int) -> str:
    conn = await db.connect(database_url)
    try:
        async with conn.transaction():
            organizer = await users.create(
                conn, email="bench@bilten.test", password_hash="x", name="Bench", role="organizer"
            )
            per_row = 25
            rows = [{"label": f"R{i + 1}", "seats": per_row} for i in range(seats // per_row)]
            venue_id = await venues.create(
                conn,
                organizer.id,
                {
                    "name": "Bench Hall",
                    "address": "1 Loop",
                    "city": "Oslo",
                    "country": "NO",
                    "timezone": "UTC",
                    "sections": [{"name": "Main", "rows": rows}],
                },
            )
            starts = datetime.now(UTC) + timedelta(days=10)
            event_id = await events.create(
                conn,
                organizer.id,
                venue_id,
                {
                    "title": "Bench Night",
                    "category": "concert",
                    "starts_at": starts,
                    "ends_at": starts + timedelta(hours=2),
                    "currency": "EUR",
                    "price_tiers": [{"name": "Main", "price_cents": 5000, "sections": ["Main"]}],
                    "ticket_types": [{"name": "Standing", "price_cents": 2000, "capacity": 500}],
                },
            )
            await events.transition(conn, event_id, "published")
        return event_id
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seats", type=int, default=1000)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    load = {"duration": args.duration, "connections": args.connections}
    with hello_world() as url:
        baseline = wrk(url + "/", **load)
    report("hello-world GET /", baseline)
    with services() as (database_url, redis_url):
        event_id = asyncio.run(make_event(database_url, args.seats))
        with bilten(database_url, redis_url, BILTEN_LIMIT_API_IP="0/60") as url:
            seat_map = httpx.get(f"{url}/events/{event_id}/seats").json()
            assert len(seat_map["seats"]) == args.seats, "the seat map is complete"
            detail = wrk(f"{url}/events/{event_id}", **load)
            report("GET /events/{id}", detail, baseline)
            seats = wrk(f"{url}/events/{event_id}/seats", **load)
            report("GET /events/{id}/seats", seats, baseline)
        with bilten(database_url, redis_url, BILTEN_LIMIT_API_IP="100000000/60") as url:
            budget = wrk(f"{url}/events/{event_id}", **load)
            report("GET /events/{id} + budget", budget, baseline)
    if args.json:
        results = {"hello": baseline, "detail": detail, "seat_map": seats, "detail_budget": budget}
        write_json(args.json, "read_path", results)


if __name__ == "__main__":
    main()
