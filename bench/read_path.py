"""The catalog's read path against a hello-world served the same way.

    python bench/read_path.py [--duration 10] [--connections 64] [--seats 1000] [--json FILE]

Creates a published event with a 1,000-seat map, then measures with wrk, one after another,
`GET /events/{id}` (event detail, from the in-process cache) and `GET /events/{id}/seats` (the
encoded seat map, checked against the event's version and served from cache) from one
`bilten serve` process without the general per-IP request budget, and the detail again from
one with it (counted in the process, sent to Redis in batches). Each is measured right after
the yardstick, a Starlette hello-world served the same way, and its ratio is to that run: on a
machine shared with other work, the load changes from one minute to the next.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import Result, bilten, hello_world, report, services, wrk
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
    results: dict[str, Result] = {}

    def measure(name: str, label: str, url: str) -> None:
        baseline = wrk(hello + "/", **load)
        report("hello-world GET /", baseline)
        results[name] = wrk(url, **load)
        report(label, results[name], baseline)
        results[f"hello_{name}"] = baseline

    with hello_world() as hello, services() as (database_url, redis_url):
        event_id = asyncio.run(make_event(database_url, args.seats))
        with bilten(database_url, redis_url, BILTEN_LIMIT_API_IP="0/60") as url:
            seat_map = httpx.get(f"{url}/events/{event_id}/seats").json()
            assert len(seat_map["seats"]) == args.seats, "the seat map is complete"
            measure("detail", "GET /events/{id}", f"{url}/events/{event_id}")
            measure("seat_map", "GET /events/{id}/seats", f"{url}/events/{event_id}/seats")
        with bilten(database_url, redis_url, BILTEN_LIMIT_API_IP="100000000/60") as url:
            measure("detail_budget", "GET /events/{id} + budget", f"{url}/events/{event_id}")
    if args.json:
        write_json(args.json, "read_path", results)


if __name__ == "__main__":
    main()
