"""The door's own CPU per request: ``POST /bookings`` through the ASGI app, in this process.

    python bench/door.py [--requests 3000] [--clients 100] [--rounds 2] [--profile FILE]
                         [--json FILE]

No server and no sockets between the client and the app: the app is driven with ASGI
messages, so what is measured is Bilten's work per request (routing, token, body, the door's
Redis script, the wait, the answer) without uvicorn's and the kernel's, which
``bench/flash_sale.py`` includes and whose share varies with the machine. PostgreSQL and Redis
are real (BILTEN_DATABASE_URL / BILTEN_REDIS_URL, else embedded ones). Three kinds of request,
``--clients`` at a time, each round after a warm-up round:

* **health**: ``GET /health``, the floor of any request;
* **refused**: a booking of a seat another queued request claimed (409 ``seat_unavailable``
  from the door's script), the answer to most requests of a sale;
* **booked**: a booking of a free seat with ``Prefer: wait=30``, answered 201 when a workers
  instance (``bilten serve --roles workers``, started here) has confirmed it.

It prints the process's CPU time (user + system) per request of each round: the figure that
stays put when other work shares the machine. ``--profile FILE`` writes a cProfile of the last
round of each kind to ``FILE.<kind>``; ``--json FILE`` the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import itertools
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import uvloop
from asgi_lifespan import LifespanManager

from bench.common import attendee_tokens, bilten_process, services
from bench.flash_sale import make_buyers, make_event
from bilten.app import create_app
from bilten.settings import Rate, Settings

SEATS = 10_000
CLAIMED = 80  # seats booked before the rounds: what the refusals ask for
PER_PERSON = 100  # the event's tickets-per-order limit, which the door checks too


class Door:
    """An app (its lifespan entered) and the buyers that call it."""

    def __init__(self, app: Any, event_id: str, seats: list[str], tokens: list[str]) -> None:
        self.app, self.event_id, self.seats, self.tokens = app, event_id, seats, tokens
        self.keys = itertools.count()

    async def call(self, path: str, token: str = "", picks: list[str] | None = None) -> int:
        body = b""
        headers = [(b"host", b"bench")]
        if picks is not None:
            body = msgspec.json.encode(
                {
                    "event_id": self.event_id,
                    "payment": {"method": "card", "token": "tok_visa"},
                    "seat_ids": picks,
                }
            )
            headers += [
                (b"authorization", b"Bearer " + token.encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"idempotency-key", b"door-%d" % next(self.keys)),
                (b"prefer", b"wait=30"),
            ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET" if picks is None else "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status = 0

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client never goes away
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, send)
        return status


async def run_round(door: Door, kind: str, requests: int, clients: int, first: int) -> dict:
    statuses: dict[int, int] = {}
    each = requests // clients

    async def client(n: int) -> None:
        for k in range(each):
            if kind == "health":
                status = await door.call("/health")
            elif kind == "refused":
                status = await door.call("/bookings", door.tokens[n], [door.seats[k % CLAIMED]])
            else:  # one free seat each, never asked for before
                seat = door.seats[CLAIMED + first + n * each + k]
                status = await door.call("/bookings", door.tokens[n], [seat])
            statuses[status] = statuses.get(status, 0) + 1

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(n) for n in range(clients)))
    wall, used = time.perf_counter() - began, time.process_time() - cpu
    return {"statuses": statuses, "wall": wall, "cpu_us": used / (each * clients) * 1e6}


async def measure(args: argparse.Namespace, database_url: str, redis_url: str) -> None:
    event_id, seats = await make_event(database_url, SEATS, PER_PERSON)
    buyers = await make_buyers(database_url, args.clients + 1)  # the last books the claimed
    secret = secrets.token_urlsafe(48)
    tokens = attendee_tokens(secret, buyers)
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        secret_key=secret,
        roles=frozenset({"api", "realtime"}),
        payment_provider="test",
        log_level="WARNING",
        limit_api_ip=Rate(0, 60),  # every request comes from one address
    )
    workers = bilten_process(
        database_url,
        redis_url,
        secret_key=secret,
        BILTEN_ROLES="workers",
        BILTEN_MAIL_POLL_INTERVAL="3600",
    )
    with workers:
        async with LifespanManager(create_app(settings)) as manager:
            door = Door(manager.app, event_id, seats, tokens)
            # The seats the refusals ask for: sold, so claimed at the door for ten minutes.
            for n in range(CLAIMED // 4):
                status = await door.call("/bookings", tokens[-1], seats[n * 4 : n * 4 + 4])
                assert status == 201, status
            booked = 0
            figures: list[dict[str, Any]] = []
            for kind in ("health", "refused", "booked"):
                for round_ in range(args.rounds + 1):  # the first one warms up
                    profile = cProfile.Profile() if args.profile and round_ == args.rounds else None
                    if profile is not None:
                        profile.enable()
                    found = await run_round(door, kind, args.requests, args.clients, booked)
                    if profile is not None:
                        profile.disable()
                        profile.dump_stats(f"{args.profile}.{kind}")
                    if kind == "booked":
                        booked += args.requests
                    if round_:
                        figures.append({"kind": kind, "requests": args.requests, **found})
                        print(
                            f"{kind:8s} {args.requests} requests {found['statuses']}  "
                            f"wall {found['wall']:.2f} s  "
                            f"CPU {found['cpu_us']:.0f} us per request",
                            flush=True,
                        )
    if args.json:
        document = {"bench": "door", "config": vars(args), "rounds": figures}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if CLAIMED + args.requests * (args.rounds + 1) > SEATS:
        raise SystemExit(f"at most {(SEATS - CLAIMED) // (args.rounds + 1)} requests a round")
    if args.requests // args.clients * (args.rounds + 1) > PER_PERSON:
        raise SystemExit(f"more than {PER_PERSON} seats for a client: give more --clients")
    with services() as (database_url, redis_url), contextlib.suppress(KeyboardInterrupt):
        uvloop.run(measure(args, database_url, redis_url))


if __name__ == "__main__":
    main()
