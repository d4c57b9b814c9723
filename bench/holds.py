"""Seat clicks: many buyers hold seats at the same moment through ``POST /holds``.

    python bench/holds.py [--buyers 1000] [--rounds 3] [--env BILTEN_NAME=VALUE ...] [--json FILE]

Creates a published event with a seat per buyer and the buyers (users made in SQL, tokens signed
with the server's secret key), starts one ``bilten serve``, opens one keep-alive connection per
buyer and, each round:

* **distinct**: every buyer holds one seat of its own, all at once (every hold succeeds);
* **taken**: every buyer asks for a seat another buyer holds (every answer is 409
  ``seat_unavailable``).

It prints holds per second (from the first request sent to the last answer), the latency
percentiles and the server's CPU time per hold (user + system, from ``/proc``: the figure that
stays put when other work shares the machine) of each round, then checks in PostgreSQL that
every seat is held by exactly the one active hold that claimed it. Needs nothing but this
project (the raw HTTP client of ``bench/flash_sale.py``); PostgreSQL and Redis from
BILTEN_DATABASE_URL / BILTEN_REDIS_URL, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import attendee_tokens, bilten_process, services
from bench.flash_sale import Http, make_buyers, make_event, percentile
from bilten import db


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def round_of(conns: list[Http], tokens_: list[str], bodies: list[bytes], pid: int):
    """Every buyer sends its hold at once: (status, seconds, body) each, the wall time and the
    server's CPU seconds."""
    go = asyncio.Event()

    async def one(http: Http, token: str, body: bytes) -> tuple[int, float, bytes]:
        headers = b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n" % (
            token.encode()
        )
        await go.wait()
        began = time.perf_counter()
        status, answer = await http.request("POST", "/holds", headers, body)
        return status, time.perf_counter() - began, answer

    tasks = [asyncio.create_task(one(*args)) for args in zip(conns, tokens_, bodies, strict=True)]
    await asyncio.sleep(0.2)
    cpu = cpu_seconds(pid)
    began = time.perf_counter()
    go.set()
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - began
    return results, wall, cpu_seconds(pid) - cpu


FIGURES: dict[str, list[float]] = {}  # name -> one value per round, for --json


def report(name: str, results, wall: float, cpu: float) -> None:
    latencies = [seconds for _, seconds, _ in results]
    FIGURES.setdefault(f"{name}_holds_per_s", []).append(round(len(results) / wall, 1))
    FIGURES.setdefault(f"{name}_server_cpu_us", []).append(round(cpu / len(results) * 1e6))
    FIGURES.setdefault(f"{name}_p50_ms", []).append(round(percentile(latencies, 0.5), 2))
    FIGURES.setdefault(f"{name}_p99_ms", []).append(round(percentile(latencies, 0.99), 2))
    statuses: dict[int, int] = {}
    for status, _, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    print(
        f"{name:9} {len(results) / wall:8.0f} holds/s  wall {wall * 1000:6.0f} ms  "
        f"p50 {percentile(latencies, 0.5):6.0f} ms  p99 {percentile(latencies, 0.99):6.0f} ms  "
        f"server CPU {cpu / len(results) * 1e6:4.0f} us each  "
        f"statuses {dict(sorted(statuses.items()))}",
        flush=True,
    )


async def release_all(database_url: str, event_id: str) -> None:
    conn = await db.connect(database_url)
    try:
        from bilten import holds

        async with conn.transaction():
            ids = await conn.fetch(
                "SELECT id::text FROM holds WHERE event_id = $1 AND status = 'active'", event_id
            )
            await holds.release_many(conn, [r["id"] for r in ids])
    finally:
        await conn.close()


async def check(database_url: str, event_id: str, expected: int) -> None:
    conn = await db.connect(database_url)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE es.status = 'held') AS held,
                      count(*) FILTER (WHERE es.status = 'held' AND h.id IS NULL) AS orphan
               FROM event_seats es LEFT JOIN holds h
                 ON h.id = es.hold_id AND h.status = 'active' AND es.seat_id = ANY (h.seat_ids)
               WHERE es.event_id = $1""",
            event_id,
        )
        bad = await conn.fetchval(
            """SELECT count(*) FROM (SELECT unnest(seat_ids) s FROM holds
               WHERE event_id = $1 AND status = 'active' GROUP BY 1 HAVING count(*) > 1) x""",
            event_id,
        )
    finally:
        await conn.close()
    ok = row["held"] == expected and row["orphan"] == 0 and bad == 0
    print(
        f"check: {row['held']} seats held (expected {expected}), {row['orphan']} without their "
        f"hold, {bad} held twice: {'ok' if ok else 'FAILED'}",
        flush=True,
    )
    if not ok:
        raise SystemExit(1)


async def main_async(
    args: argparse.Namespace, database_url: str, url: str, key: str, pid: int
) -> None:
    buyers = args.buyers
    event_id, seat_ids = await make_event(database_url, buyers, per_person=4)
    buyer_ids = await make_buyers(database_url, buyers)
    tokens_ = attendee_tokens(key, buyer_ids)
    conns = [Http(url) for _ in range(buyers)]
    await asyncio.gather(*(c.connect() for c in conns))

    def body(seat: str) -> bytes:
        return json.dumps({"event_id": event_id, "seat_ids": [seat]}).encode()

    for _ in range(args.rounds):
        results, wall, cpu = await round_of(conns, tokens_, [body(s) for s in seat_ids], pid)
        report("distinct", results, wall, cpu)
        await check(database_url, event_id, buyers)
        # everyone asks for the seat of the buyer next to them: all taken
        shifted = seat_ids[1:] + seat_ids[:1]
        results, wall, cpu = await round_of(conns, tokens_, [body(s) for s in shifted], pid)
        report("taken", results, wall, cpu)
        await release_all(database_url, event_id)
    for c in conns:
        c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buyers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    extra = dict(e.split("=", 1) for e in args.env)
    extra.setdefault("BILTEN_LIMIT_API_IP", "0/60")
    key = secrets.token_urlsafe(48)
    with services() as (database_url, redis_url):
        with bilten_process(database_url, redis_url, secret_key=key, **extra) as (url, proc):
            asyncio.run(main_async(args, database_url, url, key, proc.pid))
    if args.json:
        # Each figure of the best round (the first pays for cold caches), and every round's.
        figures = {
            name: (min(values) if name.endswith(("_ms", "_us")) else max(values))
            for name, values in FIGURES.items()
        }
        document = {"bench": "holds", "figures": figures, "rounds": FIGURES}
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
