"""A flash sale: many buyers race for the seats of one event through the booking API.

    python bench/flash_sale.py [--seats 5000] [--buyers 2000] [--instances 1] [--workers 4]
                               [--timeout 120] [--defer-mail] [--split-roles] [--api-budget]
                               [--env BILTEN_NAME=VALUE ...] [--profile FILE] [--watchers N]
                               [--watchers-apart] [--watchers-by-id] [--json FILE]

Creates a published event (one section, rows of 100 seats) and C buyers (users made in SQL,
their access tokens signed with the secret key the servers run with), starts ``--instances``
``bilten serve`` processes on one database and one Redis, opens one keep-alive connection per
buyer (buyers are spread round-robin over the instances) and lets every buyer loose at once.
Each buyer books 1-4 random seats it believes available with ``POST /bookings``
(``Idempotency-Key``, ``Prefer: wait=30``, ``tok_visa``) until the event is sold out. Buyers
share one view of the seat map, kept as a browser's live map is: the seat deltas of the event's
room over a WebSocket (``/ws``, seats named by index) move seats in and out of it, and so does
the news of seats claimed by queued bookings (``claims.indexed``); a confirmed booking and the
``seat_ids`` of a 409 remove seats from it at once; when it runs dry, it is reloaded from
``GET /events/{id}/seats`` (claimed seats left out). A buyer stops after ``--give-up`` 409s in
a row once the map shows no seat available; the whole load is bounded by ``--timeout``.

Then PostgreSQL is checked directly (nothing sold twice, seats sold == tickets == items of
confirmed bookings, no hold outliving its time, every booking finished, every confirmed booking
paid), the row writes per confirmed booking are read from pg_stat_user_tables, and, when the
server loads ``pg_stat_statements`` (``shared_preload_libraries``), the statements that took
most of its time. The same saga transactions are then timed without HTTP, queue or workers,
each on a fresh event of the same size: the saga's one-booking ``reserve`` and ``finish`` in
a tight loop over a few pooled connections, and the saga's steps (``reserve``, ``finish``) a
queue batch at a time on one connection, as one event's worker runs them. The ratio of HTTP
to SQL-only is what the HTTP path keeps of what the SQL can do.

With ``--watchers N``, N more WebSockets (the clients of ``bench/ws_fanout.py``, in two
processes of their own) subscribe to the event's room on the first instance before the sale
opens, as the browsers of people watching the map would (from the version of the seat map
read once over HTTP: no snapshot each); past their subscription they only
count what they get (``--watchers-apart``: on an instance of the realtime role alone, as an
operator would put them); they name seats by index, as the web app's map does (``--watchers-by-id``:
as ``seats`` deltas do). Printed: the bytes each got (all should get the same), and when the last
of them reached each (:func:`print_watchers`).

The sale opens ``SETTLE`` seconds after the servers answer ready (their start-up, such as the
mail worker's helper process importing, is over by then, as it is before any real sale).

The load generator is one asyncio process (uvloop, a raw HTTP/1.1 client: no per-request
client overhead beyond a write and a parse) and shares the machine's cores with the servers,
PostgreSQL and Redis; the CPU each of them used during the load is printed, so the figures can
be read against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import msgspec
import uvloop
import websockets
from redis.asyncio import Redis

from bench import ws_fanout
from bench.common import ROOT, attendee_tokens, bilten_process, services
from bilten import bookings, db, events, keys, payments, queue, sealing, users, venues
from bilten.helper import Helper
from bilten.sagas.finish import finish
from bilten.sagas.reserve import reserve_new
from bilten.settings import Settings
from bilten.workers import bookings as bookings_worker

PER_ROW = 100
GOAL_RATE = 1000.0
GOAL_RATIO = 0.3
GOAL_TAIL_RATIO = 0.8  # with --latency: the steady pace keeps this much of the zero-latency one
BODY = 0.99  # the sale's body: until this share of the seats is confirmed
STEADY = (0.1, 0.9)  # the sale's steady part: between these shares of the seats confirmed
SWEEP_INTERVAL = 1.0  # bilten.sagas.recovery.INTERVAL
GRACE = 5.0  # seconds allowed beyond a hold's expiry (sweep interval, clocks, commit lag)
REQUEST_TIMEOUT = 45.0  # a booking answers within Prefer: wait=30 plus its own work
SETTLE = 2.0  # seconds between the servers answering ready and the sale opening


# --- setup ------------------------------------------------------------------------------------


async def make_event(database_url: str, seats: int, per_person: int) -> tuple[str, list[str]]:
    """A published event of ``seats`` seats in rows of 100; returns its id and its seat ids."""
    conn = await db.connect(database_url)
    try:
        async with conn.transaction():
            organizer = await users.create(
                conn,
                email=f"organizer-{uuid.uuid4().hex[:8]}@bench.test",
                password_hash="x",
                name="Bench",
                role="organizer",
            )
            rows = [
                {"label": f"R{i + 1}", "seats": min(PER_ROW, seats - i * PER_ROW)}
                for i in range(math.ceil(seats / PER_ROW))
            ]
            venue_id = await venues.create(
                conn,
                organizer.id,
                {
                    "name": "Flash Arena",
                    "address": "1 Loop",
                    "city": "Oslo",
                    "country": "NO",
                    "timezone": "UTC",
                    "sections": [{"name": "Floor", "rows": rows}],
                },
            )
            starts = datetime.now(UTC) + timedelta(days=30)
            event_id = await events.create(
                conn,
                organizer.id,
                venue_id,
                {
                    "title": "Flash Sale Night",
                    "category": "concert",
                    "starts_at": starts,
                    "ends_at": starts + timedelta(hours=3),
                    "currency": "EUR",
                    "max_tickets_per_order": per_person,
                    "price_tiers": [{"name": "Floor", "price_cents": 5000, "sections": ["Floor"]}],
                },
            )
            await events.transition(conn, event_id, "published")
        seat_ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT seat_id::text AS id FROM event_seats WHERE event_id = $1", event_id
            )
        ]
        return event_id, seat_ids
    finally:
        await conn.close()


async def make_buyers(database_url: str, count: int) -> list[str]:
    """``count`` attendees, straight into the users table (nobody logs in)."""
    conn = await db.connect(database_url)
    try:
        rows = await conn.fetch(
            """INSERT INTO users (email, password_hash, name, role)
               SELECT 'buyer-' || g || '-' || $1 || '@bench.test', 'x', 'Buyer ' || g, 'attendee'
               FROM generate_series(1, $2) g RETURNING id::text""",
            secrets.token_hex(4),
            count,
        )
        return [r["id"] for r in rows]
    finally:
        await conn.close()


# --- a minimal HTTP/1.1 client ----------------------------------------------------------------


class Http(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; a request at a time. A protocol, not streams: the
    load generator shares the machine with what it measures, so it spends as little as it can
    (answers with a Content-Length only, which is what Bilten sends)."""

    def __init__(self, url: str, source: str | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.source = source  # a local address of its own (127.x.y.z), as a distinct client
        self.host_header = f"Host: {self.host}:{self.port}\r\n".encode()
        self.transport: Any = None  # uvloop's TCPTransport
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    async def connect(self) -> None:
        if self.transport is None:
            loop = asyncio.get_running_loop()
            local = (self.source, 0) if self.source else None
            await loop.create_connection(lambda: self, self.host, self.port, local_addr=local)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end]).split(b"\r\n")
        length, close = 0, False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = b"close" in value.lower()
            elif name == b"transfer-encoding":
                self.waiter.set_exception(ValueError("chunked answers are not read here"))
                return
        if len(self.buffer) < end + 4 + length:
            return  # the rest of the body is on its way
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        self.waiter.set_result((int(head[0].split(b" ", 2)[1]), body))
        if close:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.transport = None
        self.buffer.clear()

    async def request(
        self, method: str, path: str, headers: bytes = b"", body: bytes = b""
    ) -> tuple[int, bytes]:
        try:
            await self.connect()
            assert self.transport is not None
            self.waiter = asyncio.get_running_loop().create_future()
            self.transport.write(
                b"%s %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n%s"
                % (method.encode(), path.encode(), self.host_header, headers, len(body), body)
            )
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self.waiter
        except BaseException:
            self.close()  # whatever state the connection is in, it is not reused
            raise
        finally:
            self.waiter = None


# --- the buyers' shared view of the seats -----------------------------------------------------


class _Seat(msgspec.Struct):
    id: str
    status: str


class _SeatMap(msgspec.Struct):
    version: int
    seats: list[_Seat]


_decode_map = msgspec.json.Decoder(_SeatMap).decode


class _Details(msgspec.Struct):
    seat_ids: list[str] = []


class _Error(msgspec.Struct):
    code: str
    details: _Details = msgspec.field(default_factory=_Details)


class _ErrorBody(msgspec.Struct):
    error: _Error


_decode_error = msgspec.json.Decoder(_ErrorBody).decode


class View:
    """Seats believed available: O(1) removal, random picks."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ids: list[str] = []
        self.where: dict[str, int] = {}
        self.sold: set[str] = set()  # sold is final: never believed available again
        # Claimed by queued bookings (``seats.claimed``): not available while the claim lasts,
        # whatever a seat map fetched meanwhile says (snapshots do not show claims).
        self.claimed: set[str] = set()

    def load(self, available: list[str]) -> None:
        self.ids = [s for s in available if s not in self.sold and s not in self.claimed]
        self.where = {s: i for i, s in enumerate(self.ids)}

    def add(self, seat_id: str) -> None:
        if seat_id not in self.where and seat_id not in self.sold and seat_id not in self.claimed:
            self.where[seat_id] = len(self.ids)
            self.ids.append(seat_id)

    def drop(self, seat_ids: list[str]) -> None:
        for seat in seat_ids:
            i = self.where.pop(seat, None)
            if i is None:
                continue
            last = self.ids.pop()
            if last != seat:
                self.ids[i] = last
                self.where[last] = i

    def pick(self, k: int) -> list[str]:
        return self.rng.sample(self.ids, min(k, len(self.ids))) if self.ids else []


@dataclass
class MapState:
    available: int = -1
    held: int = 0
    sold: int = 0
    fetched_at: float = 0.0


class SeatMapReader:
    """Reloads the shared view from GET /events/{id}/seats, one fetch at a time, not too often."""

    MIN_AGE = 0.25

    def __init__(self, url: str, event_id: str, view: View) -> None:
        self.http = Http(url)
        self.path = f"/events/{event_id}/seats"
        self.view = view
        self.state = MapState()
        self.task: asyncio.Task[None] | None = None
        self.fetches = 0
        self.errors = 0

    async def refresh(self) -> MapState:
        if self.task is None or self.task.done():
            if time.monotonic() - self.state.fetched_at < self.MIN_AGE:
                return self.state
            self.task = asyncio.create_task(self._fetch())
        await asyncio.shield(self.task)
        return self.state

    async def _fetch(self) -> None:
        try:
            status, body = await self.http.request("GET", self.path)
        except (OSError, TimeoutError):
            status, body = 0, b""
        if status != 200:  # the previous view stands; the next refresh tries again
            self.state.fetched_at = time.monotonic()
            self.errors += 1
            return
        seat_map = _decode_map(body)
        counts = Counter(s.status for s in seat_map.seats)
        self.view.load([s.id for s in seat_map.seats if s.status == "available"])
        self.state = MapState(counts["available"], counts["held"], counts["sold"], time.monotonic())
        self.fetches += 1


class _SeatId(msgspec.Struct):
    id: str


class _Message(msgspec.Struct):
    type: str
    seats: list[_SeatId] = []  # seats.snapshot: the order that indexes refer to
    changes: dict[str, list[int]] = {}  # seats.indexed: status -> [index, age, ...]
    claimed: list[int] = []  # claims.indexed
    released: list[int] = []


_decode_message = msgspec.json.Decoder(_Message).decode


async def watch_live_map(url: str, event_id: str, view: View) -> int:
    """Keep the shared view in step with the event's seat deltas and the news of the queue's
    claims over one WebSocket, as a browser's live map is (until cancelled), seats named by
    index (``"indexed": true``); returns the messages applied."""
    applied = 0
    order: list[str] = []
    subscribe = {"type": "subscribe", "room": f"event:{event_id}", "indexed": True}
    with contextlib.suppress(OSError, websockets.ConnectionClosed):
        async with websockets.connect(url.replace("http", "ws", 1) + "/ws", max_size=None) as ws:
            await ws.send(msgspec.json.encode(subscribe))
            async for raw in ws:
                message = _decode_message(raw)
                if message.type == "seats.snapshot":
                    order = [seat.id for seat in message.seats]
                    continue
                if message.type == "claims.indexed":
                    claimed = [order[i] for i in message.claimed]
                    view.claimed.update(claimed)
                    view.drop(claimed)
                    for seat in (order[i] for i in message.released):
                        view.claimed.discard(seat)
                        view.add(seat)
                    applied += 1
                    continue
                if message.type != "seats.indexed":
                    continue
                for status, pairs in message.changes.items():
                    for seat in (order[i] for i in pairs[::2]):
                        view.claimed.discard(seat)
                        if status == "available":
                            view.add(seat)
                        else:
                            view.drop([seat])
                            if status == "sold":
                                view.sold.add(seat)
                applied += 1
    return applied


# --- the load -----------------------------------------------------------------------------------


@dataclass
class Load:
    started: float = 0.0  # the sale opened: every buyer sends its first request
    last_confirmed: float = 0.0
    ended: float = 0.0
    timed_out: bool = False
    seats_confirmed: int = 0
    # A booking is one Idempotency-Key: its first request until its final answer (a 202 after
    # Prefer: wait=30 is followed by the same request again, which waits on).
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[int] = field(default_factory=Counter)  # every HTTP request
    transport_errors: int = 0
    map_fetches: int = 0
    map_errors: int = 0
    stopped: Counter[str] = field(default_factory=Counter)
    confirmations: list[tuple[float, int]] = field(default_factory=list)  # (when, seats)


def source_address(n: int) -> str:
    """Buyer ``n``'s own loopback address (all of 127.0.0.0/8 is loopback on Linux)."""
    return f"127.{1 + n // 62500}.{n // 250 % 250}.{2 + n % 250}"


async def run_load(
    urls: list[str],
    event_id: str,
    seat_ids: list[str],
    buyer_tokens: list[str],
    per_person: int,
    timeout: float,
    give_up: int,
    on_start: Callable[[], None] = lambda: None,
    own_addresses: bool = False,
) -> Load:
    rng = random.Random(2024)
    view = View(rng)
    view.load(seat_ids)
    reader = SeatMapReader(urls[0], event_id, view)
    live = asyncio.create_task(watch_live_map(urls[0], event_id, view))
    total = len(seat_ids)
    load = Load()
    sold_out = asyncio.Event()  # no seat left to ask for: buyers stop starting requests
    all_confirmed = asyncio.Event()  # every seat's 201 answered: the load is over
    sale = event_id[:8].encode()  # keys of their own in each sale of one run
    body_head = b'{"event_id":"%s","payment":{"method":"card","token":"tok_visa"},"seat_ids":' % (
        event_id.encode()
    )

    async def book(http: Http, headers: bytes, picks: list[str]) -> tuple[int, bytes]:
        """One booking to its final answer: the same request again after a 202 or a broken
        connection (the same key and body: the server finds the booking and waits on)."""
        body = body_head + msgspec.json.encode(picks) + b"}"
        while True:
            try:
                status, answer = await http.request("POST", "/bookings", headers, body)
            except (OSError, TimeoutError):
                load.transport_errors += 1
                await asyncio.sleep(0.1)
                continue
            load.statuses[status] += 1
            if status == 202:
                continue
            if status in (429, 503):
                await asyncio.sleep(0.2)
                continue
            return status, answer

    async def buyer(n: int, http: Http, token: str, go: asyncio.Event) -> str:
        auth = (
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\nPrefer: wait=30\r\n"
            % token.encode()
        )
        bought = 0
        streak = 0  # 409s in a row
        await go.wait()
        for attempt in itertools.count():
            if sold_out.is_set():
                return "sold out"
            allowance = per_person - bought
            if allowance <= 0:
                return "per-person limit reached"
            picks = view.pick(rng.randint(1, min(4, allowance)))
            if not picks:
                state = await reader.refresh()
                if state.sold == total:
                    sold_out.set()
                    return "sold out"
                if not view.ids:  # held seats sell or come back; a fresher map will tell
                    await asyncio.sleep(0.2)
                continue
            began = time.perf_counter()
            status, answer = await book(
                http, auth + b"Idempotency-Key: %s-%d-%d\r\n" % (sale, n, attempt), picks
            )
            done = time.perf_counter()
            if status == 201:
                outcome = "201 confirmed"
                bought += len(picks)
                streak = 0
                view.sold.update(picks)
                view.drop(picks)
                load.seats_confirmed += len(picks)
                load.confirmations.append((done, len(picks)))
                load.last_confirmed = max(load.last_confirmed, done)
                if load.seats_confirmed >= total:
                    sold_out.set()
                    all_confirmed.set()
            elif status == 409:
                error = _decode_error(answer).error
                outcome = f"409 {error.code}"
                streak += 1
                view.drop(error.details.seat_ids or picks)
            else:
                outcome = str(status)
                await asyncio.sleep(0.2)
            load.outcomes[outcome] += 1
            load.latencies[outcome].append(done - began)
            if outcome == "409 conflict":  # the per-person limit
                return "per-person limit reached"
            if streak >= give_up:
                state = await reader.refresh()
                if state.available == 0:
                    return "gave up: nothing available"
                streak = 0
        raise AssertionError("unreachable")

    conns = [
        Http(urls[i % len(urls)], source_address(i) if own_addresses else None)
        for i in range(len(buyer_tokens))
    ]
    # Everyone connects first (a few hundred at a time), then the sale opens for all at once.
    for start in range(0, len(conns), 200):
        await asyncio.gather(*(c.connect() for c in conns[start : start + 200]))
    go = asyncio.Event()
    tasks = [
        asyncio.create_task(buyer(n, http, token, go))
        for n, (http, token) in enumerate(zip(conns, buyer_tokens, strict=True))
    ]
    await asyncio.sleep(0)
    on_start()
    load.started = time.perf_counter()
    go.set()
    everyone = asyncio.gather(*tasks)
    sold = asyncio.create_task(all_confirmed.wait())
    try:
        # Over when every buyer has stopped, or at once when every seat's confirmation has been
        # answered (the requests still in flight are then abandoned: they can only be refused).
        # A map showing every seat sold stops new requests, not those in flight: with a slow
        # payment provider, seats show sold while their buyers still wait for the answer.
        done, _ = await asyncio.wait(
            {everyone, sold}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
        load.timed_out = not done
    finally:
        load.ended = time.perf_counter()
        sold.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if everyone.done() and not everyone.cancelled():
            everyone.exception()  # retrieved here; each buyer's is counted below
        for task in tasks:
            if task.cancelled():
                load.stopped["in flight at the end"] += 1
            elif task.exception() is not None:
                load.stopped[f"failed: {task.exception()!r}"] += 1
            else:
                load.stopped[task.result()] += 1
        for http in conns:
            http.close()
        reader.http.close()
        load.map_fetches, load.map_errors = reader.fetches, reader.errors
        live.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await live
    return load


# --- CPU accounting -----------------------------------------------------------------------------


@dataclass
class CpuSample:
    groups: dict[str, float]  # CPU seconds so far of the load generator, bilten, PostgreSQL...
    others: dict[int, tuple[str, float]]  # every other process: pid -> (name, CPU seconds)


def _cpu_sample(server_pids: list[int]) -> CpuSample:
    tick = os.sysconf("SC_CLK_TCK")
    groups: dict[str, float] = defaultdict(float)
    others: dict[int, tuple[str, float]] = {}
    own = os.times()
    groups["load generator"] = own.user + own.system
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        used = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if int(entry) in server_pids:
            groups["bilten"] += used
            groups[f"bilten {entry}"] = used
        elif comm.startswith("postgres"):
            groups["postgresql"] += used
        elif comm.startswith("redis"):
            groups["redis"] += used
        else:
            others[int(entry)] = (comm, used)
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    groups["machine busy"] = (sum(cpu) - cpu[3] - cpu[4]) / tick  # minus idle and iowait
    return CpuSample(groups, others)


def cpu_snapshot(server_pids: list[int]) -> CpuSample | None:
    """Where CPU time went so far (Linux /proc), else None."""
    try:
        return _cpu_sample(server_pids)
    except (OSError, ValueError, IndexError):
        return None


# --- checks in PostgreSQL -----------------------------------------------------------------------


async def wait_until_settled(database_url: str, event_id: str, limit: float) -> int:
    """Wait (at most ``limit`` s) until no booking of the event is under way; returns how many
    still are."""
    conn = await db.connect(database_url)
    try:
        deadline = time.monotonic() + limit
        seen = -1
        while True:
            # Requests of buyers that have already hung up may still be arriving at the
            # server: settled means nothing under way and no new booking for a second.
            await asyncio.sleep(1.0)
            total, open_ = await conn.fetchrow(
                """SELECT count(*), count(*) FILTER (WHERE saga_state IN
                          ('PENDING', 'SEATS_RESERVED', 'PAYMENT_PENDING'))
                   FROM bookings WHERE event_id = $1""",
                event_id,
            )
            settled = open_ == 0 and total == seen
            seen = total
            if settled or time.monotonic() > deadline:
                if open_:
                    states = await conn.fetch(
                        """SELECT saga_state, count(*) AS n, min(updated_at) AS oldest
                           FROM bookings WHERE event_id = $1 AND saga_state IN
                           ('PENDING', 'SEATS_RESERVED', 'PAYMENT_PENDING') GROUP BY 1""",
                        event_id,
                    )
                    print(
                        "  under way: "
                        + ", ".join(
                            f"{r['saga_state']} {r['n']} (oldest {r['oldest']:%H:%M:%S})"
                            for r in states
                        )
                    )
                return int(open_)
    finally:
        await conn.close()


_CHECKS = {
    "seats sold twice (tickets)": """
        SELECT count(*) FROM (SELECT seat_id FROM tickets
                              WHERE event_id = $1 AND seat_id IS NOT NULL AND status <> 'void'
                              GROUP BY seat_id HAVING count(*) > 1) twice""",
    "seats sold twice (confirmed bookings)": """
        SELECT count(*) FROM (SELECT i.seat_id FROM booking_items i
                              JOIN bookings b ON b.id = i.booking_id
                              WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED'
                                AND i.seat_id IS NOT NULL
                              GROUP BY i.seat_id HAVING count(*) > 1) twice""",
    "sold seats not matching a confirmed booking's item": """
        SELECT count(*) FROM (
            (SELECT seat_id, booking_id FROM event_seats WHERE event_id = $1 AND status = 'sold'
             EXCEPT
             SELECT i.seat_id, b.id FROM booking_items i JOIN bookings b ON b.id = i.booking_id
             WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED')
            UNION ALL
            (SELECT i.seat_id, b.id FROM booking_items i JOIN bookings b ON b.id = i.booking_id
             WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED'
             EXCEPT
             SELECT seat_id, booking_id FROM event_seats WHERE event_id = $1 AND status = 'sold')
        ) diff""",
    "valid tickets not matching a sold seat": """
        SELECT count(*) FROM (
            (SELECT seat_id, booking_id FROM tickets WHERE event_id = $1 AND status <> 'void'
             EXCEPT
             SELECT seat_id, booking_id FROM event_seats WHERE event_id = $1 AND status = 'sold')
            UNION ALL
            (SELECT seat_id, booking_id FROM event_seats WHERE event_id = $1 AND status = 'sold'
             EXCEPT
             SELECT seat_id, booking_id FROM tickets WHERE event_id = $1 AND status <> 'void')
        ) diff""",
    "active holds past their expiry": f"""
        SELECT count(*) FROM holds WHERE event_id = $1 AND status = 'active'
        AND expires_at < now() - interval '{GRACE} seconds'""",
    "held seats past their expiry": f"""
        SELECT count(*) FROM event_seats WHERE event_id = $1 AND status = 'held'
        AND hold_expires_at < now() - interval '{SWEEP_INTERVAL + GRACE} seconds'""",
    "bookings not finished": """
        SELECT count(*) FROM bookings WHERE event_id = $1
        AND saga_state IN ('PENDING', 'SEATS_RESERVED', 'PAYMENT_PENDING')""",
    "confirmed bookings not paid": """
        SELECT count(*) FROM bookings WHERE event_id = $1 AND saga_state = 'CONFIRMED'
        AND payment_status <> 'succeeded'""",
    "confirmed bookings without their tickets": """
        SELECT count(*) FROM bookings b WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED'
        AND (SELECT count(*) FROM booking_items i WHERE i.booking_id = b.id)
            <> (SELECT count(*) FROM tickets t WHERE t.booking_id = b.id AND t.status <> 'void')""",
    "failed bookings still holding seats": """
        SELECT count(*) FROM bookings b
        WHERE b.event_id = $1 AND b.saga_state = 'FAILED'
          AND (EXISTS (SELECT 1 FROM holds h WHERE h.id = b.hold_id AND h.status = 'active')
               OR EXISTS (SELECT 1 FROM event_seats es
                          WHERE es.event_id = b.event_id AND es.booking_id = b.id))""",
}


@dataclass
class Verdict:
    counts: dict[str, int]
    sold: int
    tickets: int
    items: int
    confirmed: int
    failed: int
    failures: Counter[str]

    @property
    def oversold(self) -> int:
        return max(
            self.counts["seats sold twice (tickets)"],
            self.counts["seats sold twice (confirmed bookings)"],
        )

    @property
    def ok(self) -> bool:
        return (
            not any(self.counts.values())
            and self.sold == self.tickets == self.items
            and self.oversold == 0
        )


async def verify(database_url: str, event_id: str) -> Verdict:
    conn = await db.connect(database_url)
    try:
        counts = {name: int(await conn.fetchval(sql, event_id)) for name, sql in _CHECKS.items()}
        sold = await conn.fetchval(
            "SELECT count(*) FROM event_seats WHERE event_id = $1 AND status = 'sold'", event_id
        )
        tickets = await conn.fetchval(
            """SELECT count(*) FROM tickets WHERE event_id = $1 AND seat_id IS NOT NULL
               AND status <> 'void'""",
            event_id,
        )
        items = await conn.fetchval(
            """SELECT count(*) FROM booking_items i JOIN bookings b ON b.id = i.booking_id
               WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED' AND i.seat_id IS NOT NULL""",
            event_id,
        )
        states = dict(
            await conn.fetch(
                "SELECT saga_state, count(*) FROM bookings WHERE event_id = $1 GROUP BY 1",
                event_id,
            )
        )
        failures = Counter(
            dict(
                await conn.fetch(
                    """SELECT failure_code, count(*) FROM bookings
                       WHERE event_id = $1 AND saga_state = 'FAILED' GROUP BY 1""",
                    event_id,
                )
            )
        )
        return Verdict(
            counts,
            sold,
            tickets,
            items,
            states.get("CONFIRMED", 0),
            states.get("FAILED", 0),
            failures,
        )
    finally:
        await conn.close()


# --- the SQL-only baseline ----------------------------------------------------------------------


@dataclass
class Baseline:
    name: str
    bookings: int
    seconds: float
    detail: str

    @property
    def rate(self) -> float:
        return self.bookings / self.seconds


@dataclass
class Orders:
    """Booking requests for every seat of an event, 1-4 seats each, buyers in turn within the
    per-person limit."""

    event_id: str
    ids: list[str]
    seats: list[list[str]]
    requests: list[queue.Request]


async def make_orders(
    database_url: str,
    seats: int,
    buyer_ids: list[str],
    per_person: int,
) -> Orders:
    """The event's seats shuffled into orders of 1-4, as queued requests."""
    event_id, seat_ids = await make_event(database_url, seats, per_person)
    rng = random.Random(7)
    rng.shuffle(seat_ids)
    orders: list[list[str]] = []
    while seat_ids:
        k = rng.randint(1, 4)
        orders.append(seat_ids[:k])
        del seat_ids[:k]
    owners: list[str] = []
    bought: Counter[str] = Counter()
    turn = itertools.cycle(buyer_ids)
    for order in orders:
        owner = next(turn)
        while bought[owner] + len(order) > per_person:
            owner = next(turn)
        bought[owner] += len(order)
        owners.append(owner)
    ids = [queue.new_request_id(event_id) for _ in orders]
    requests = [
        queue.Request(
            id=booking_id,
            user_id=owner,
            event_id=event_id,
            key=booking_id,
            digest="bench",
            request={"seat_ids": order, "ticket_type_id": None, "quantity": len(order)},
            provider="test",
            token="tok_visa",
        )
        for booking_id, order, owner in zip(ids, orders, owners, strict=True)
    ]
    return Orders(event_id, ids, orders, requests)


def _charge(booking_id: str, seats: int) -> payments.Charge:
    return payments.Charge(
        id=f"tpay_{booking_id}", amount_cents=5000 * seats, currency="EUR", status="succeeded"
    )


async def _checked(database_url: str, orders: Orders, seats: int) -> None:
    verdict = await verify(database_url, orders.event_id)
    if not verdict.ok or verdict.sold != seats:
        raise SystemExit(f"the SQL-only baseline left a broken event: {verdict}")


async def sql_baseline(
    database_url: str,
    seats: int,
    buyer_ids: list[str],
    per_person: int,
    connections: int,
    secret_key: str,
) -> Baseline:
    """The saga's two transactions per booking (``reserve``, ``finish``) in a tight loop over
    ``connections`` pooled connections, a booking at a time on each."""
    settings = Settings(
        database_url=database_url,
        db_pool_min=connections,
        db_pool_max=connections,
        secret_key=secret_key,
    )
    pool = await db.create_pool(settings)
    app: Any = types.SimpleNamespace(
        db=pool,
        settings=settings,
        payments=None,
        keyring=sealing.keyring(settings),
        helper=Helper(),  # not started: codes signed in this process
    )
    reserve_time = confirm_time = 0.0
    try:
        orders = await make_orders(database_url, seats, buyer_ids, per_person)
        work = iter(zip(orders.ids, orders.seats, orders.requests, strict=True))

        async def book() -> None:
            nonlocal reserve_time, confirm_time
            for booking_id, wanted, request in work:
                began = time.perf_counter()
                reserved = (await _reserve(app, [request]))[booking_id]
                if reserved is None or reserved.state != "PAYMENT_PENDING":
                    raise SystemExit(f"SQL-only baseline: reserve gave {reserved}")
                middle = time.perf_counter()
                charge = _charge(booking_id, len(wanted))
                done = (await finish(app, {booking_id: charge})).get(booking_id)
                if done is None or done.state != "CONFIRMED":
                    raise SystemExit(f"SQL-only baseline: finish gave {done}")
                reserve_time += middle - began
                confirm_time += time.perf_counter() - middle

        began = time.perf_counter()
        await asyncio.gather(*(book() for _ in range(connections)))
        seconds = time.perf_counter() - began
    finally:
        await pool.close()
    await _checked(database_url, orders, seats)
    n = len(orders.ids)
    return Baseline(
        f"per booking, {connections} connection(s)",
        n,
        seconds,
        f"per booking: reserve {1000 * reserve_time / n:.2f} ms, confirm "
        f"{1000 * confirm_time / n:.2f} ms",
    )


async def _reserve(app: Any, requests: list[queue.Request]) -> dict[str, Any]:
    """The saga's first step for queued requests, in a transaction of its own, as a worker
    runs it: their seats reserved and their bookings written."""
    async with app.db.acquire() as conn, conn.transaction():
        _, new, currencies = await bookings.standing(conn, requests)
        outcomes, _ = await reserve_new(conn, new, currencies)
    return outcomes


async def sql_batch_baseline(
    database_url: str,
    seats: int,
    buyer_ids: list[str],
    per_person: int,
    size: int,
    secret_key: str,
) -> Baseline | None:
    """The saga's batch transactions (the seats reserved and the bookings written, ``finish``), one
    batch of ``size`` after another on one connection, as one event's queue worker runs them."""
    settings = Settings(
        database_url=database_url, db_pool_min=1, db_pool_max=1, secret_key=secret_key
    )
    pool = await db.create_pool(settings)
    app: Any = types.SimpleNamespace(
        db=pool,
        settings=settings,
        payments=None,
        keyring=sealing.keyring(settings),
        helper=Helper(),  # not started: codes signed in this process
    )
    reserve_time = confirm_time = 0.0
    try:
        orders = await make_orders(database_url, seats, buyer_ids, per_person)
        wanted = dict(zip(orders.ids, orders.seats, strict=True))
        began = time.perf_counter()
        for start in range(0, len(orders.ids), size):
            chunk = orders.ids[start : start + size]
            t0 = time.perf_counter()
            reserved = await _reserve(app, orders.requests[start : start + size])
            if any(o is None or o.state != "PAYMENT_PENDING" for o in reserved.values()):
                raise SystemExit(f"SQL-only batch baseline: reserve gave {reserved}")
            t1 = time.perf_counter()
            paid: dict[str, Any] = {b: _charge(b, len(wanted[b])) for b in chunk}
            finished = await finish(app, paid)
            if len(finished) != len(chunk) or any(
                o.state != "CONFIRMED" for o in finished.values()
            ):
                raise SystemExit(f"SQL-only batch baseline: finish gave {finished}")
            reserve_time += t1 - t0
            confirm_time += time.perf_counter() - t1
        seconds = time.perf_counter() - began
    finally:
        await pool.close()
    await _checked(database_url, orders, seats)
    batches = math.ceil(len(orders.ids) / size)
    return Baseline(
        f"batches of {size}, 1 connection",
        len(orders.ids),
        seconds,
        f"per batch: bookings made and reserved {1000 * reserve_time / batches:.1f} ms, confirm "
        f"{1000 * confirm_time / batches:.1f} ms",
    )


# --- reporting ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def goal(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def body(load: Load, seats: int) -> tuple[float, float]:
    """The sale's body: seconds from the first request until ``BODY`` of the seats were
    confirmed, and the confirmed bookings per second over that time. The last seats wait for
    the slowest charges: a hung one keeps its seats until its timeout, and only then are they
    sold again, so the whole sale's figure measures the provider's tail more than the server."""
    wanted = math.ceil(BODY * seats)
    sold = bookings = 0
    for when, count in sorted(load.confirmations):
        sold += count
        bookings += 1
        if sold >= wanted:
            window = when - load.started
            return window, bookings / window if window > 0 else 0.0
    return 0.0, 0.0


def steady(load: Load, seats: int) -> float:
    """Confirmed bookings per second while the sale runs at its pace: from the confirmation that
    took the sold seats past the first ``STEADY`` share to the one that took them past the
    second. Unlike the body, it leaves out the pipeline's filling and emptying, which a
    provider's latency lengthens by about one charge without changing the pace."""
    low, high = (math.ceil(share * seats) for share in STEADY)
    sold = bookings = 0
    began = 0.0
    for when, count in sorted(load.confirmations):
        sold += count
        if began:
            bookings += 1
        elif sold >= low:
            began = when
        if sold >= high:
            return bookings / (when - began) if when > began else 0.0
    return 0.0


def print_load(load: Load, seats: int) -> float:
    """The load's figures; returns confirmed bookings per second."""
    confirmed = load.outcomes["201 confirmed"]
    window = (load.last_confirmed or load.ended) - load.started
    rate = confirmed / window if window > 0 and confirmed else 0.0
    print(
        f"load: {load.seats_confirmed}/{seats} seats confirmed in {window:.2f} s "
        f"(first request -> last confirmation){'; TIMED OUT' if load.timed_out else ''}"
    )
    print(
        f"  confirmed bookings/s   {rate:9.1f}   (goal >= {GOAL_RATE:,.0f}: "
        f"{goal(rate >= GOAL_RATE)})"
    )
    body_window, body_rate = body(load, seats)
    if body_window:
        print(
            f"  to {BODY:.0%} of the seats  {body_rate:9.1f}   bookings/s in {body_window:.2f} s; "
            f"the last {1 - BODY:.0%} took {window - body_window:.2f} s more"
        )
    print(
        f"  steady pace            {steady(load, seats):9.1f}   bookings/s from "
        f"{STEADY[0]:.0%} to {STEADY[1]:.0%} of the seats"
    )
    print(f"  seats sold/s           {load.seats_confirmed / window if window > 0 else 0:9.1f}")
    requests = sum(load.statuses.values())
    print(
        f"  HTTP requests {requests} ({requests / (load.ended - load.started):.1f}/s), by status: "
        + ", ".join(f"{s} {n}" for s, n in sorted(load.statuses.items()))
        + f"; transport errors {load.transport_errors}; seat-map fetches {load.map_fetches}"
        + (f" ({load.map_errors} failed)" if load.map_errors else "")
    )
    print("  bookings by outcome (latency from the first request to the final answer):")
    for outcome, values in sorted(load.latencies.items()):
        print(
            f"    {outcome:<26} {len(values):>7}  p50 {percentile(values, 0.5):8.1f} ms  "
            f"p99 {percentile(values, 0.99):8.1f} ms"
        )
    print("  buyers stopped: " + ", ".join(f"{k} {v}" for k, v in sorted(load.stopped.items())))
    return rate


Writes = dict[str, tuple[int, int, int, int]]  # table: inserted, updated, HOT-updated, deleted


async def table_writes(database_url: str) -> Writes:
    """The database's row writes by table so far (pg_stat_user_tables)."""
    conn = await db.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del "
            "FROM pg_stat_user_tables"
        )
    finally:
        await conn.close()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


async def confirmed_bookings(database_url: str, event_id: str) -> int:
    conn = await db.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM bookings WHERE event_id = $1 AND saga_state = 'CONFIRMED'",
                event_id,
            )
        )
    finally:
        await conn.close()


def print_writes(before: Writes, after: Writes, confirmed: int) -> None:
    """Row writes during the sale, per confirmed booking, by table (pg_stat_user_tables)."""
    if not confirmed:
        return
    print(
        "  row writes per confirmed booking (pg_stat_user_tables; HOT: updates that wrote no "
        "index entry):"
    )
    total = [0, 0, 0, 0]
    for table in sorted(after):
        ins, upd, hot, dele = (
            a - b for a, b in zip(after[table], before.get(table, (0, 0, 0, 0)), strict=True)
        )
        if ins == upd == dele == 0:
            continue
        for n, value in enumerate((ins, upd, hot, dele)):
            total[n] += value
        print(
            f"    {table:24} ins {ins / confirmed:5.2f}  upd {upd / confirmed:5.2f} "
            f"(HOT {hot / max(upd, 1):4.0%})  del {dele / confirmed:5.2f}"
        )
    print(
        f"    {'all tables':24} ins {total[0] / confirmed:5.2f}  upd {total[1] / confirmed:5.2f} "
        f"(HOT {total[2] / max(total[1], 1):4.0%})  del {total[3] / confirmed:5.2f}"
    )


async def reset_statements(database_url: str) -> bool:
    """Start pg_stat_statements afresh; False when the server has not loaded it (it must be in
    ``shared_preload_libraries``)."""
    conn = await db.connect(database_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


async def print_statements(database_url: str, confirmed: int, top: int = 15) -> None:
    """The statements that took the most of PostgreSQL's time during the sale, per confirmed
    booking (pg_stat_statements, all processes, this bench's own queries included)."""
    if not confirmed:
        return
    conn = await db.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT calls, rows, total_exec_time, shared_blks_dirtied, wal_records,
                      regexp_replace(left(query, 400), '\s+', ' ', 'g') AS query
               FROM pg_stat_statements ORDER BY total_exec_time DESC"""
        )
    finally:
        await conn.close()
    total = sum(r["total_exec_time"] for r in rows)
    calls = sum(r["calls"] for r in rows)
    wal = sum(r["wal_records"] for r in rows)
    print(
        f"  statements per confirmed booking (pg_stat_statements): {calls / confirmed:.2f} calls, "
        f"{total / confirmed:.3f} ms executing, {wal / confirmed:.1f} WAL records; the top {top}:"
    )
    for r in rows[:top]:
        print(
            f"    {r['total_exec_time'] / confirmed:6.3f} ms {r['calls'] / confirmed:5.2f} calls "
            f"{r['rows'] / confirmed:6.2f} rows {r['wal_records'] / confirmed:5.1f} WAL  "
            f"{r['query'][:110]}"
        )


def print_cpu(
    before: CpuSample | None, after: CpuSample | None, wall: float, names: dict[int, str]
) -> None:
    """CPU used during the load by each group of processes; ``names``: the servers' roles."""
    if before is None or after is None or wall <= 0:
        return
    cores = os.cpu_count() or 1
    used = {k: v - before.groups.get(k, 0.0) for k, v in after.groups.items()}
    groups = ("load generator", "bilten", "postgresql", "redis")
    used["other"] = max(0.0, used["machine busy"] - sum(used.get(k, 0.0) for k in groups))
    parts = ", ".join(f"{k} {used[k]:.1f} s ({100 * used[k] / wall:.0f}%)" for k in groups)
    idle = 100 * (1 - used["machine busy"] / (cores * wall))
    print(
        f"  CPU over {wall:.1f} s, in % of one core: {parts}, other {used['other']:.1f} s "
        f"({100 * used['other'] / wall:.0f}%); {cores} cores, machine idle {idle:.0f}%"
    )
    by_name: Counter[str] = Counter()
    for pid, (name, seconds) in after.others.items():
        by_name[name] += seconds - before.others.get(pid, (name, 0.0))[1]
    busiest = [(n, t) for n, t in by_name.most_common(4) if t >= 0.05 * wall]
    if busiest:
        print("  other processes: " + ", ".join(f"{n} {t:.1f} s" for n, t in busiest))
    if len(names) > 1:
        print(
            "  bilten by process: "
            + ", ".join(
                f"{name} {used.get(f'bilten {pid}', 0.0):.1f} s" for pid, name in names.items()
            )
        )


def print_verdict(verdict: Verdict, seats: int) -> None:
    print("verification (PostgreSQL):")
    print(
        f"  {'oversold seats':<50} {verdict.oversold:>6}   (goal 0: {goal(verdict.oversold == 0)})"
    )
    for name, count in verdict.counts.items():
        print(f"  {name:<50} {count:>6}   {'ok' if count == 0 else 'FAILED'}")
    same = verdict.sold == verdict.tickets == verdict.items
    print(
        f"  seats sold {verdict.sold}/{seats} == valid seat tickets {verdict.tickets} == "
        f"items of confirmed bookings {verdict.items}   {'ok' if same else 'FAILED'}"
    )
    failures = ", ".join(f"{k} {v}" for k, v in verdict.failures.most_common())
    print(
        f"  bookings: confirmed {verdict.confirmed}, failed {verdict.failed}"
        + (f" ({failures})" if failures else "")
    )


def print_baseline(result: Baseline) -> None:
    print(
        f"SQL-only baseline, {result.name}: {result.bookings} bookings in "
        f"{result.seconds:.2f} s = {result.rate:.1f} bookings/s  ({result.detail})",
        flush=True,
    )


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seats", type=int, default=5000)
    parser.add_argument("--buyers", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=1, help="bilten serve processes")
    parser.add_argument(
        "--workers", type=int, default=None, help="BILTEN_BOOKING_WORKERS of each instance"
    )
    parser.add_argument("--timeout", type=float, default=120, help="bound on the load, seconds")
    parser.add_argument(
        "--give-up", type=int, default=5, help="409s in a row before a buyer checks the map"
    )
    parser.add_argument(
        "--api-budget",
        action="store_true",
        help="keep the per-IP API budget on (set very high): a Redis round trip per request",
    )
    parser.add_argument(
        "--defer-mail",
        action="store_true",
        help="keep the confirmation mail queued during the run (mail poll interval of an hour)",
    )
    parser.add_argument(
        "--default",
        action="store_true",
        help="as a user runs it: one bilten serve with every role, mail sent, the per-IP API "
        "budget on at its default; each buyer comes from an address of its own (127.x.y.z)",
    )
    parser.add_argument(
        "--split-roles",
        action="store_true",
        help="the instances serve HTTP only (api,realtime); one more runs the workers",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the servers, e.g. BILTEN_DB_POOL_MAX=20",
    )
    parser.add_argument(
        "--sql-connections",
        default="1,4",
        help="connection counts of the per-booking SQL-only baseline",
    )
    parser.add_argument(
        "--sql-batch",
        type=int,
        default=bookings_worker.BATCH,
        help="batch size of the batched SQL-only baseline (the queue's); 0 skips it",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the SQL-only baseline")
    parser.add_argument(
        "--latency",
        metavar="DIST",
        help="then the same sale again on a fresh event, the test provider answering with this "
        "latency (BILTEN_TEST_PAYMENT_LATENCY_MS, e.g. 150,2000,0.001), and the ratio of the "
        "two",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record each server with py-spy (raw format, FILE.PID) while the load runs",
    )
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument(
        "--watchers",
        type=int,
        default=0,
        help="this many more WebSockets watch the event's seat map on the first instance "
        "(bench/ws_fanout.py's clients, in processes of their own), timed as they get each frame",
    )
    parser.add_argument(
        "--watchers-apart",
        action="store_true",
        help="the watchers on an instance of their own (--roles realtime), not the first",
    )
    parser.add_argument(
        "--watchers-by-id",
        action="store_true",
        help="the watchers take seat changes naming seats by id, not by index",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.default and (args.split_roles or args.defer_mail or args.instances != 1):
        parser.error("--default is one instance with every role and mail sent")
    if args.seats < 1 or args.buyers < 1 or args.instances < 1:
        parser.error("--seats, --buyers and --instances must be positive")
    if args.watchers < 0:
        parser.error("--watchers must be 0 or more")
    if (args.watchers_apart or args.watchers_by_id) and not args.watchers:
        parser.error("--watchers-apart and --watchers-by-id go with --watchers N")
    return args


def server_env(args: argparse.Namespace, data_dir: str) -> dict[str, str]:
    env = {
        "BILTEN_LIMIT_API_IP": "100000000/60" if args.api_budget else "0/60",
        **({"BILTEN_LIMIT_API_IP": ""} if args.default else {}),  # the default budget
        "BILTEN_ACCESS_TOKEN_TTL": "3600",
        "BILTEN_DATA_DIR": data_dir,  # mail is written to files here, and thrown away
    }
    if args.workers is not None:
        env["BILTEN_BOOKING_WORKERS"] = str(args.workers)
    if args.defer_mail:
        env["BILTEN_MAIL_POLL_INTERVAL"] = "3600"
    if args.watchers:
        # The watchers all come from 127.0.0.1; a sale's browsers come from addresses of their own.
        env["BILTEN_WS_MAX_PER_IP"] = str(args.watchers + 100)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("BILTEN_"):
            raise SystemExit(f"--env wants BILTEN_NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def open_watchers(
    count: int,
    url: str,
    api: str,
    event_id: str,
    stack: contextlib.ExitStack,
    by_id: bool = False,
) -> ws_fanout.Clients | None:
    """``count`` WebSockets subscribed to the event's room at ``url`` (the seat map's version
    read from ``api``), in two processes, seats named by index (``by_id``: as in ``seats``
    deltas)."""
    if not count:
        return None
    began = time.perf_counter()
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    # As a page does: the seat map over HTTP, then the room from its version on (no snapshot).
    with urllib.request.urlopen(f"{api}/events/{event_id}/seats", timeout=30) as answer:
        version = json.load(answer)["version"]
    target = ws_fanout.Target(
        host, port, event_id, count_only=True, indexed=not by_id, version=version
    )
    clients = ws_fanout.Clients(target)
    stack.callback(clients.close)
    errors = clients.open([count // 2, count - count // 2])
    print(
        f"watchers: {clients.sockets} sockets subscribed to the event's room at {url} in "
        f"{time.perf_counter() - began:.1f} s" + (f"; errors: {errors[:3]}" if errors else ""),
        flush=True,
    )
    return clients


def print_watchers(clients: ws_fanout.Clients, last_confirmed: float, cpu_before: float) -> None:
    """What the watching sockets got: the bytes of every frame since each subscribed (all
    watch one room from before the sale, so all should get the same bytes), and when the last
    of them reached each. The first socket's last byte is timed from the sale's last
    confirmation (the room's last frame may be a ``queue.served`` count, sent at most once a
    second); every other socket's from the first's: how far behind the fan-out ran."""
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until nothing has come for 0.5 s
        time.sleep(0.5)
        now_seen = clients.counted()
        if now_seen == seen:
            break
        seen = now_seen
    sizes = [size for size, _ in seen if size >= 0]
    lasts = [last for size, last in seen if size >= 0]
    if not lasts:
        print(f"  watchers: none of {len(seen)} sockets subscribed")
        return
    most = max(sizes)
    short = sum(1 for size in sizes if size < most)
    first = min(lasts)
    behind = [last - first for last in lasts]
    print(
        f"  watchers: {len(sizes)} of {len(seen)} sockets subscribed got {most / 1024:.0f} KiB "
        f"each ({short} got less); the first had its last byte "
        f"{(first - last_confirmed) * 1000:.0f} ms after the sale's last confirmation, the others "
        f"after the first: p50 {percentile(behind, 0.5):.0f} ms, p99 "
        f"{percentile(behind, 0.99):.0f} ms, max {max(behind) * 1000:.0f} ms"
    )
    got = clients.collect()
    if got.codes or got.lost or got.errors:
        print(f"    closed by the server {got.codes}, lost {got.lost}, errors {got.errors[:3]}")
    print(f"    their clients used {got.cpu - cpu_before:.1f} s of CPU from the sale's start")


class Profiler:
    """py-spy on every server process (one FILE.PID each), started when the sale opens."""

    def __init__(self, pids: list[int], output: str | None, seconds: int) -> None:
        self.pids, self.output, self.seconds = pids, output, seconds
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self) -> None:
        for pid in self.pids if self.output else []:
            output = f"{self.output}.{pid}"
            command = [str(ROOT / ".venv/bin/py-spy"), "record", "-p", str(pid), "-f", "raw"]
            command += ["-d", str(self.seconds), "-o", output, "--nonblocking"]
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((output, proc))

    def finish(self) -> None:
        for output, proc in self.procs:
            try:
                proc.wait(self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(f"  py-spy profile: {output}")


def http_run(
    args: argparse.Namespace,
    database_url: str,
    redis_url: str,
    secret_key: str,
    event_id: str,
    seat_ids: list[str],
    buyer_ids: list[str],
    per_person: int,
    data_dir: str,
    extra_env: dict[str, str] | None = None,
) -> tuple[float, Load]:
    """Run the sale over HTTP and wait for it to settle; returns confirmed bookings per second
    and the load's record."""
    began = time.perf_counter()
    buyer_tokens = attendee_tokens(secret_key, buyer_ids)
    env = {**server_env(args, data_dir), **(extra_env or {})}
    with contextlib.ExitStack() as stack:

        def serve(roles: str | None = None) -> tuple[str, subprocess.Popen[bytes]]:
            """One more server, with these roles (None: every role)."""
            role = {"BILTEN_ROLES": roles} if roles else {}
            server = bilten_process(database_url, redis_url, secret_key=secret_key, **env, **role)
            return stack.enter_context(server)

        started = [
            serve("api,realtime" if args.split_roles else None) for _ in range(args.instances)
        ]
        urls = [url for url, _ in started]
        pids = [proc.pid for _, proc in started]
        names = [f"{url} (pid {pid})" for url, pid in zip(urls, pids, strict=True)]
        if args.split_roles:
            _, proc = serve("workers")
            pids.append(proc.pid)
            names.append(f"workers (pid {proc.pid})")
        watched = urls[0]
        if args.watchers_apart:
            watched, proc = serve("realtime")
            pids.append(proc.pid)
            names.append(f"realtime for the watchers {watched} (pid {proc.pid})")
        print(
            f"setup: event {event_id}, {len(buyer_ids)} buyers; {', '.join(names)}; "
            f"{time.perf_counter() - began:.1f} s",
            flush=True,
        )
        watchers = open_watchers(
            args.watchers, watched, urls[0], event_id, stack, args.watchers_by_id
        )
        # Ready is not idle: the mail worker's helper process is still importing. A sale opens
        # on servers that have been up a while, so it waits for their start-up to be over.
        time.sleep(SETTLE)
        profiler = Profiler(pids, args.profile, args.profile_seconds)
        watchers_cpu = watchers.collect().cpu if watchers is not None else 0.0
        cpu_before = cpu_snapshot(pids)
        writes_before = asyncio.run(table_writes(database_url))
        statements = asyncio.run(reset_statements(database_url))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            load = runner.run(
                run_load(
                    urls,
                    event_id,
                    seat_ids,
                    buyer_tokens,
                    per_person,
                    args.timeout,
                    args.give_up,
                    profiler.start,
                    own_addresses=args.default,
                )
            )
        cpu_after = cpu_snapshot(pids)
        wall = time.time() - time.perf_counter()  # load's clock to the sockets' stamps
        rate = print_load(load, args.seats)
        roles = [f"http {n + 1}" for n in range(args.instances)]
        roles += ["workers"] if args.split_roles else []
        roles += ["realtime"] if args.watchers_apart else []
        print_cpu(
            cpu_before, cpu_after, load.ended - load.started, dict(zip(pids, roles, strict=True))
        )
        unfinished = asyncio.run(wait_until_settled(database_url, event_id, 60))
        if unfinished:
            print(f"  {unfinished} bookings still under way after 60 s")
        if watchers is not None:
            print_watchers(watchers, wall + (load.last_confirmed or load.ended), watchers_cpu)
        time.sleep(1.5)  # backends report their table statistics about once a second
        confirmed = asyncio.run(confirmed_bookings(database_url, event_id))
        print_writes(writes_before, asyncio.run(table_writes(database_url)), confirmed)
        if statements:
            asyncio.run(print_statements(database_url, confirmed))
        profiler.finish()
    return rate, load


async def forget_pending_mail(database_url: str) -> None:
    conn = await db.connect(database_url)
    try:
        await conn.execute("DELETE FROM mail_jobs WHERE status = 'pending'")
    finally:
        await conn.close()


def latency_run(
    args: argparse.Namespace,
    database_url: str,
    redis_url: str,
    secret_key: str,
    buyer_ids: list[str],
    per_person: int,
    data_dir: str,
    load: Load,
    rate: float,
    events_made: list[str],
) -> tuple[dict[str, Any], Verdict]:
    """The same sale on a fresh event, the test provider answering with ``--latency``; prints
    what the payment tail keeps of the zero-latency figures. Returns those figures and the
    second sale's verdict."""
    print(f"the same sale again, the payment provider's latency {args.latency} ms:", flush=True)
    # The first sale's mail left pending would be sent by the new servers during this one.
    asyncio.run(forget_pending_mail(database_url))
    event_id, seat_ids = asyncio.run(make_event(database_url, args.seats, per_person))
    events_made.append(event_id)
    slow_rate, slow = http_run(
        args,
        database_url,
        redis_url,
        secret_key,
        event_id,
        seat_ids,
        buyer_ids,
        per_person,
        data_dir,
        {"BILTEN_TEST_PAYMENT_LATENCY_MS": args.latency},
    )
    verdict = asyncio.run(verify(database_url, event_id))
    print_verdict(verdict, args.seats)
    _, body_rate = body(load, args.seats)
    _, slow_body = body(slow, args.seats)
    body_ratio = slow_body / body_rate if body_rate else 0.0
    whole_ratio = slow_rate / rate if rate else 0.0
    pace = steady(load, args.seats)
    slow_pace = steady(slow, args.seats)
    pace_ratio = slow_pace / pace if pace else 0.0
    print(
        f"ratio with the payment latency / without, at the steady pace: {pace_ratio:.2f}   "
        f"(goal >= {GOAL_TAIL_RATIO}: {goal(pace_ratio >= GOAL_TAIL_RATIO)}); "
        f"to {BODY:.0%} of the seats: {body_ratio:.2f}; to the last confirmation: {whole_ratio:.2f}"
    )
    return {
        "latency_steady_bookings_per_s": round(slow_pace, 1),
        "latency_steady_ratio": round(pace_ratio, 2),
        "latency_ms": args.latency,
        "latency_bookings_per_s": round(slow_rate, 1),
        "latency_body_bookings_per_s": round(slow_body, 1),
        "latency_body_ratio": round(body_ratio, 2),
        "latency_whole_ratio": round(whole_ratio, 2),
    }, verdict


async def forget_in_redis(redis_url: str, database_url: str, event_id: str) -> None:
    """Delete what the run left in a Redis that outlives it: the event's queue, seat claims and
    seat maps, the request statuses, idempotency keys and test-payment ledger entries of its
    bookings."""
    conn = await db.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT id::text, user_id::text, idempotency_key FROM bookings WHERE event_id = $1",
            event_id,
        )
        booking_ids = [r["id"] for r in rows]
    finally:
        await conn.close()
    redis = Redis.from_url(redis_url)
    try:
        found = [key async for key in redis.scan_iter(keys.seat_map(event_id, "*"), count=1000)]
        names = [keys.queue(event_id), keys.queue_ticket(event_id), keys.queue_served(event_id)]
        names += [keys.queue_lease(event_id), keys.seat_claims(event_id), *found]
        names += [keys.idempotency(event_id, r["user_id"], r["idempotency_key"]) for r in rows]
        for booking_id in booking_ids:
            names += [keys.booking_request(booking_id), keys.test_payment(booking_id)]
        for start in range(0, len(names), 1000):
            await redis.delete(*names[start : start + 1000])
        await redis.srem(keys.QUEUE_ACTIVE, event_id)
    finally:
        await redis.aclose()


async def drop_database(database_url: str) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    conn = await db.connect(db.with_database(database_url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def budget_words(args: argparse.Namespace) -> str:
    if args.default:
        return "on (its default, an address per buyer)"
    return "on" if args.api_budget else "off"


def main() -> None:
    args = parse_args()
    # Every buyer may buy a fair share and more: the sale can sell out whoever is quickest.
    per_person = min(100, max(10, math.ceil(2 * args.seats / args.buyers)))
    if per_person * args.buyers < args.seats:
        print(f"warning: {args.buyers} buyers x {per_person} seats cannot buy {args.seats} seats")
    if args.watchers:  # for this process and, inherited, the servers and the watchers
        ws_fanout.raise_fd_limit(args.watchers + 2 * args.buyers + 1000)
    secret_key = secrets.token_urlsafe(48)
    external = bool(os.environ.get("BILTEN_DATABASE_URL"))
    print(
        f"flash sale: {args.seats} seats, {args.buyers} buyers (at most {per_person} seats "
        f"each), {args.instances} instance(s), booking workers "
        f"{args.workers or 'default'}, API budget {budget_words(args)}, "
        f"mail {'deferred' if args.defer_mail else 'sent'}"
        + (", workers in an instance of their own" if args.split_roles else "")
        + "".join(f", {e}" for e in args.env)
        + f"; PostgreSQL {'external' if external else 'embedded'}, Redis "
        f"{'external' if os.environ.get('BILTEN_REDIS_URL') else 'embedded'}",
        flush=True,
    )
    tail: dict[str, Any] = {}
    with services() as (database_url, redis_url), tempfile.TemporaryDirectory() as data_dir:
        event_id = ""
        events_made: list[str] = []
        try:
            event_id, seat_ids = asyncio.run(make_event(database_url, args.seats, per_person))
            events_made.append(event_id)
            buyer_ids = asyncio.run(make_buyers(database_url, args.buyers))
            rate, load = http_run(
                args,
                database_url,
                redis_url,
                secret_key,
                event_id,
                seat_ids,
                buyer_ids,
                per_person,
                data_dir,
            )
            verdict = asyncio.run(verify(database_url, event_id))
            print_verdict(verdict, args.seats)
            baselines: list[Baseline] = []
            if not args.no_baseline:
                for connections in args.sql_connections.split(","):
                    baselines.append(
                        asyncio.run(
                            sql_baseline(
                                database_url,
                                args.seats,
                                buyer_ids,
                                per_person,
                                int(connections),
                                secret_key,
                            )
                        )
                    )
                    print_baseline(baselines[-1])
                if args.sql_batch:
                    batched = asyncio.run(
                        sql_batch_baseline(
                            database_url,
                            args.seats,
                            buyer_ids,
                            per_person,
                            args.sql_batch,
                            secret_key,
                        )
                    )
                    if batched is not None:
                        baselines.append(batched)
                        print_baseline(batched)
            for baseline in baselines[-2:]:
                ratio = rate / baseline.rate
                print(
                    f"ratio HTTP path / SQL-only ({baseline.name}): {ratio:.2f}   "
                    f"(goal >= {GOAL_RATIO}: {goal(ratio >= GOAL_RATIO)})"
                )
            if args.latency:
                tail, tail_verdict = latency_run(
                    args,
                    database_url,
                    redis_url,
                    secret_key,
                    buyer_ids,
                    per_person,
                    data_dir,
                    load,
                    rate,
                    events_made,
                )
                if not tail_verdict.ok:
                    verdict = tail_verdict  # the summary and the exit status cover both sales
            print(
                f"summary: {rate:.1f} confirmed bookings/s (goal >= {GOAL_RATE:,.0f}), "
                f"oversold {verdict.oversold} (goal 0), "
                f"checks {'passed' if verdict.ok else 'FAILED'}"
            )
        finally:
            for made in events_made if os.environ.get("BILTEN_REDIS_URL") else []:
                asyncio.run(forget_in_redis(redis_url, database_url, made))
            if external:
                asyncio.run(drop_database(database_url))
    if args.json:
        write_json(args.json, args, rate, load, verdict, baselines, tail)
    if not verdict.ok:
        raise SystemExit(1)


def write_json(
    path: str,
    args: argparse.Namespace,
    rate: float,
    load: Load,
    verdict: Verdict,
    baselines: list[Baseline],
    tail: dict[str, Any],
) -> None:
    """The figures, bookings and seats confirmed per half second, and the latency of each
    outcome as percentiles (the schema: bench/suite.py)."""
    step = 0.5
    buckets = math.ceil(max(0.0, (load.last_confirmed or load.ended) - load.started) / step) + 1
    bookings_per_step, seats_per_step = [0] * buckets, [0] * buckets
    for when, seats in load.confirmations:
        k = min(buckets - 1, max(0, int((when - load.started) / step)))
        bookings_per_step[k] += 1
        seats_per_step[k] += seats
    window = (load.last_confirmed or load.ended) - load.started
    figures: dict[str, Any] = {
        "bookings_per_s": round(rate, 1),
        "seats_per_s": round(load.seats_confirmed / window, 1) if window > 0 else 0.0,
        "seats_confirmed": load.seats_confirmed,
        "oversold": verdict.oversold,
        "checks_ok": verdict.ok,
        "timed_out": load.timed_out,
    }
    body_window, body_rate = body(load, args.seats)
    figures["body_bookings_per_s"] = round(body_rate, 1)
    figures["body_seconds"] = round(body_window, 2)
    figures["steady_bookings_per_s"] = round(steady(load, args.seats), 1)
    figures.update(tail)
    for baseline in baselines:
        figures[f"sql_only_per_s ({baseline.name})"] = round(baseline.rate, 1)
    latency = {
        outcome: {
            q: round(percentile(values, p), 2)
            for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        }
        for outcome, values in load.latencies.items()
    }
    document = {
        "bench": "flash_sale",
        "config": {
            "seats": args.seats,
            "buyers": args.buyers,
            "instances": args.instances,
            "split_roles": args.split_roles,
            "defer_mail": args.defer_mail,
            "default": args.default,
            "env": args.env,
        },
        "figures": figures,
        "latency_ms": latency,
        "series": {
            "confirmed": {
                "t": [round(k * step, 3) for k in range(buckets)],
                "values": {
                    "bookings_per_s": [n / step for n in bookings_per_step],
                    "seats_per_s": [n / step for n in seats_per_step],
                },
            }
        },
    }
    Path(path).write_text(msgspec.json.format(msgspec.json.encode(document)).decode() + "\n")


if __name__ == "__main__":
    main()
