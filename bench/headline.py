"""The headline run: 100,000 buyers queue for the 5,000 tickets of one sale through nginx.

    python bench/headline.py [--buyers 100000] [--seats 5000] [--layout 2+1]
                             [--connections 2000] [--sockets 4] [--own-sockets]
                             [--arrival SECONDS] [--timeout 600] [--defer-mail]
                             [--nginx-workers 2] [--nginx-access-log FILE] [--json FILE]
                             [--env BILTEN_NAME=VALUE ...]

Needs nginx (Debian's package: ``apt-get install nginx``; it runs ``deploy/nginx.conf`` itself,
see ``bench/cluster.py``), PostgreSQL and Redis from ``BILTEN_DATABASE_URL`` /
``BILTEN_REDIS_URL`` (a fresh database is made on that server and dropped afterwards; what the
run leaves in Redis is deleted), else embedded servers. ``--buyers 5000`` is a run of well
under a minute.

**The sale.** One published event sells ``--seats`` general-admission tickets (one ticket type
of that capacity, ``max_tickets_per_order`` 4); every buyer asks for one. General admission and
not seats: the point is a queue in which every buyer gets a place. With seats the door refuses
a seat another queued request has claimed (409 at once, no place in the queue), so most buyers
would never queue; that path is ``bench/flash_sale.py``'s. The layout (``--layout``, default
``2+1``: two instances ``--roles api,realtime`` behind nginx, one ``--roles workers``) runs
with mail sent (written to files), the test payment provider, the per-IP API budget at its
default and ``BILTEN_QUEUE_MAX`` raised above the number of buyers (its default, 10,000
waiting, would answer the rest 503).

**The buyers.** Users made in SQL; each buyer's access token is signed with the instances'
secret key. Each buyer is a coroutine with its own token and its own client address
(``source_address(n)`` of ``bench/flash_sale.py``, 127.x.y.z), so the per-IP budget counts
buyers, as it does in production. A machine cannot hold 100,000 sockets open at once (this
one's file limit is 20,000, for the generator and for nginx alike), so buyers share a pool of
``--connections`` keep-alive connections to nginx: a buyer takes a free connection for one
request and gives it back, buyers waiting for one served in turn (so a buyer's later requests
queue behind the opening rush of the others' first ones, as they would at a saturated door).
The generator then stands where a CDN or TLS terminator stands in
production, and sends the buyer's address in ``X-Forwarded-For``; nginx appends the address it
saw (127.0.0.1, which the instances trust) and the instances believe the buyer's. With
``--own-sockets`` each request instead goes on a connection of its own from the buyer's own
address (at most ``--connections`` at once), as a browser's would; nothing is forwarded then,
but every request costs a TCP connection.

Every buyer sends ``POST /bookings`` (1 unit, ``Idempotency-Key``, no ``Prefer: wait``) at the
opening; it is answered 202 ``{request_id, position}`` (a 503 or 429 is sent again with the
same key after a pause). Then the buyer follows its request the way the web app follows it,
without a socket of its own: ``--sockets`` anonymous WebSockets (through nginx) watch the
event's room, which carries ``queue.served``, the queue's counter (at most once a second per
instance); a buyer's place is its ``position`` plus ``served`` as known when it asked, and it
sends ``GET /bookings/requests/{id}`` once the counter reaches it, again (with the place it
is told) while it is still queued, and with a growing pause (0.25 s doubling to 2 s) while it
is being processed or an answer is an error, until the answer is final. Should the sockets
carry nothing, a buyer asks at least every ``max(5 s, places ahead / 100 per s)``; should the
counter start again (Redis lost the queue: recovery queues every accepted request again with
a new place), every waiting buyer asks for its new place. The load is bounded by
``--timeout``. ``--arrival`` spreads the buyers' first requests over that many seconds.

**What is measured.** Enqueue latency (a request written to its 202 answered, p50/p99) and the
time from the opening to each buyer's place (which includes waiting for a pooled connection);
the queue's counters (Redis) and the tickets sold (PostgreSQL) every half second: queue depth,
places served per second, bookings per second, time to sell out; the memory (RSS; PSS for
PostgreSQL, whose shared buffers every process maps) and CPU of every process, every second:
each instance, nginx's workers, PostgreSQL (its own processes and this database's backends),
Redis (the whole server, whatever else it holds) and the generator. nginx's error log is
summed up. A run in which Redis lost the queue (its counter went back; ``FLUSHALL`` calls are
counted too: a shared Redis may be flushed by someone else's tests) says so: its checks still
hold, its timings and order figures are not an undisturbed run's.

**Checks.** Every buyer got a place (202) or, once the worker had found the tickets gone, was
answered 409 ``sold_out`` at the door at once (no place, nothing written); every placed
request ended; in PostgreSQL exactly
``--seats`` tickets sold (the ticket type's counter, the confirmed bookings' items, the valid
tickets) and the invariants of ``bench/flash_sale.py``'s ``verify``. **Order**: a request's
place is its ticket, the queue counter it drew at the door (kept in Redis with its status);
the times are the steps of the booking's history: reserved (``PAYMENT_PENDING``, the units
given out) and confirmed (``CONFIRMED``). Units are given out strictly in arrival order (a
batch of 200 at a time, each after the one before committed), so with every card accepted the
first ``--seats`` places are sold and no later one ("sold beyond": 0), and nobody is reserved
after a later place (0). Confirmation is looser: the worker keeps up to
``BILTEN_QUEUE_IN_FLIGHT`` (8) batches' worth of requests in hand (8 x 200), paying while it
reserves the next batch, and confirms them in waves as their charges are answered, so the
window is 1,600 places: nobody should be confirmed after someone more than 1,600 places behind them,
unless their own charge was slow (over a second from reservation to confirmation): a slow
charge holds up only its own booking, which others overtake for as long as it takes, by
design. Printed: sold beyond the first ``--seats`` places, the largest overtaking in
reservation, and for confirmations the fraction of pairs of confirmed bookings in the other
order than their places, the largest displacement (a booking's rank by confirmation time
minus its rank by place), the largest overtaking (how many places behind someone confirmed
strictly before you was), and how many bookings were overtaken beyond the window, with a slow
charge and without one (the run fails on the latter, or on any reservation out of order).

``--json FILE`` writes the figures, the time series and the latency histograms (the schema is
in ``bench/suite.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import heapq
import itertools
import json
import os
import random
import resource
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
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
from redis.exceptions import RedisError

from bench.cluster import Cluster, Layout, Processes, cluster, machine_busy, mib
from bench.common import attendee_tokens, services
from bench.flash_sale import (
    Http,
    forget_in_redis,
    make_buyers,
    percentile,
    source_address,
    verify,
    wait_until_settled,
)
from bilten import db, events, keys, users, venues
from bilten.workers.bookings import BATCH

SAMPLE_EVERY = 0.5  # seconds between samples of the queue and the sales
PROCESS_EVERY = 1.0  # seconds between samples of the processes
PROGRESS_EVERY = 5.0  # seconds between progress lines
FALLBACK_RATE = 100.0  # places a second a buyer assumes when the sockets carry nothing
FALLBACK_MIN = 5.0
IN_FLIGHT = 8  # BILTEN_QUEUE_IN_FLIGHT's default


def in_flight(env: list[str]) -> int:
    """BILTEN_QUEUE_IN_FLIGHT as the instances run with it."""
    found = [e.partition("=")[2] for e in env if e.startswith("BILTEN_QUEUE_IN_FLIGHT=")]
    return int(found[-1]) if found and found[-1].isdigit() else IN_FLIGHT


SLOW = 1.0  # seconds from reservation to confirmation: a slow charge, overtaken by design
HISTOGRAM_EDGES_MS = [
    0.5 * 2 ** (k / 4) for k in range(4 * 17)
]  # 0.5 ms .. ~33 s, four buckets per doubling


# --- setup --------------------------------------------------------------------------------------


async def make_sale(database_url: str, capacity: int) -> tuple[str, str]:
    """A published general-admission event: one ticket type of ``capacity`` units (the venue's
    one small section is not on sale). Returns the event's and the ticket type's ids."""
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
            venue_id = await venues.create(
                conn,
                organizer.id,
                {
                    "name": "Headline Field",
                    "address": "1 Loop",
                    "city": "Oslo",
                    "country": "NO",
                    "timezone": "UTC",
                    "sections": [{"name": "Stage", "rows": [{"label": "A", "seats": 1}]}],
                },
            )
            starts = datetime.now(UTC) + timedelta(days=60)
            event_id = await events.create(
                conn,
                organizer.id,
                venue_id,
                {
                    "title": "Headline Night",
                    "category": "concert",
                    "starts_at": starts,
                    "ends_at": starts + timedelta(hours=4),
                    "currency": "EUR",
                    "max_tickets_per_order": 4,
                    "ticket_types": [
                        {"name": "Standing", "price_cents": 5000, "capacity": capacity}
                    ],
                },
            )
            await events.transition(conn, event_id, "published")
        ticket_type_id = await conn.fetchval(
            "SELECT id::text FROM ticket_types WHERE event_id = $1", event_id
        )
        return event_id, ticket_type_id
    finally:
        await conn.close()


# --- connections --------------------------------------------------------------------------------


class Lanes:
    """The generator's connections to nginx: a shared pool of keep-alive connections (the
    buyer's address forwarded), or with ``own`` a connection per request from the buyer's own
    address; at most ``size`` open either way."""

    def __init__(self, url: str, size: int, own: bool) -> None:
        self.url, self.size, self.own = url, size, own
        self.idle: list[Http] = [] if own else [Http(url) for _ in range(size)]
        self.waiting: deque[asyncio.Future[Http]] = deque()
        self.slots = asyncio.Semaphore(size)
        self.connects = 0

    async def open(self) -> None:
        for start in range(0, len(self.idle), 200):
            await asyncio.gather(*(c.connect() for c in self.idle[start : start + 200]))
        self.connects += len(self.idle)

    async def request(
        self, n: int, method: str, path: str, headers: bytes, body: bytes = b""
    ) -> tuple[int, bytes, float]:
        """One request for buyer ``n``: (status, body, seconds from writing it to the answer)."""
        if self.own:
            async with self.slots:
                http = Http(self.url, source_address(n))
                try:
                    await http.connect()
                    self.connects += 1
                    began = time.perf_counter()
                    status, answer = await http.request(method, path, headers, body)
                    return status, answer, time.perf_counter() - began
                finally:
                    http.close()
        http = self.idle.pop() if self.idle else await self._wait()
        try:
            if http.transport is None:
                self.connects += 1
            began = time.perf_counter()
            status, answer = await http.request(
                method,
                path,
                headers + b"X-Forwarded-For: %s\r\n" % source_address(n).encode(),
                body,
            )
            return status, answer, time.perf_counter() - began
        finally:
            self._give_back(http)

    async def _wait(self) -> Http:
        future: asyncio.Future[Http] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return await future

    def _give_back(self, http: Http) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(http)
                return
        self.idle.append(http)

    def close(self) -> None:
        for http in self.idle:
            http.close()


# --- the queue counter, as the event's room tells it ---------------------------------------------


class _Served(msgspec.Struct):
    type: str
    served: int = 0


_decode_served = msgspec.json.Decoder(_Served).decode


class Tracker:
    """``served``, the event's queue counter, from ``queue.served`` messages on a few anonymous
    WebSockets; wakes each buyer when the counter reaches its place."""

    def __init__(self) -> None:
        self.served = 0
        self.messages = 0
        self.reconnects = 0
        self.resets = 0
        self.heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self.seq = 0

    def update(self, served: int) -> None:
        self.messages += 1
        if served < self.served // 2:
            # The counter started again (Redis lost it and recovery queued the requests again):
            # every place known is stale, so every waiting buyer asks for its new one.
            self.resets += 1
            self.served = served
            waiting, self.heap = self.heap, []
            for _, _, future in waiting:
                if not future.done():
                    future.set_result(None)
            return
        if served <= self.served:
            return
        self.served = served
        while self.heap and self.heap[0][0] <= served:
            _, _, future = heapq.heappop(self.heap)
            if not future.done():
                future.set_result(None)

    async def wait_for(self, place: int) -> None:
        """Until the counter reaches ``place``, or a fallback time has passed."""
        if self.served >= place:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self.seq += 1
        heapq.heappush(self.heap, (place, self.seq, future))
        fallback = max(FALLBACK_MIN, (place - self.served) / FALLBACK_RATE)
        timer = loop.call_later(fallback, _wake, future)
        try:
            await future
        finally:
            timer.cancel()

    async def watch(self, url: str, event_id: str) -> None:
        """One socket, reconnecting until cancelled."""
        subscribe = msgspec.json.encode({"type": "subscribe", "room": f"event:{event_id}"})
        ping = msgspec.json.encode({"type": "ping"})
        while True:
            try:
                async with websockets.connect(
                    url.replace("http", "ws", 1) + "/ws", max_size=None
                ) as ws:
                    await ws.send(subscribe)
                    last_ping = time.monotonic()
                    while True:
                        try:
                            raw = await asyncio.wait_for(ws.recv(), 30)
                        except TimeoutError:
                            raw = b""
                        if time.monotonic() - last_ping > 30:
                            await ws.send(ping)
                            last_ping = time.monotonic()
                        if raw and b'"queue.served"' in (
                            raw if isinstance(raw, bytes) else raw.encode()
                        ):
                            self.update(_decode_served(raw).served)
            except (OSError, websockets.WebSocketException, TimeoutError):
                self.reconnects += 1
                await asyncio.sleep(1.0)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --- the buyers ---------------------------------------------------------------------------------


class _Queued(msgspec.Struct):
    request_id: str
    position: int


class _Error(msgspec.Struct):
    code: str


class _Status(msgspec.Struct):
    status: str
    position: int | None = None
    error: _Error | None = None


class _ErrorBody(msgspec.Struct):
    error: _Error


_decode_queued = msgspec.json.Decoder(_Queued).decode
_decode_status = msgspec.json.Decoder(_Status).decode
_decode_error = msgspec.json.Decoder(_ErrorBody).decode


@dataclass
class Load:
    opened: float = 0.0  # perf_counter at the opening
    opened_wall: float = 0.0  # time.time() at the opening
    ended: float = 0.0
    timed_out: bool = False
    placed: int = 0  # buyers answered 202
    finals: int = 0  # buyers whose request ended
    last_placed: float = 0.0
    last_final: float = 0.0
    enqueue_wire: list[float] = field(default_factory=list)  # request written -> 202
    to_place: list[float] = field(default_factory=list)  # opening -> 202
    to_final: list[float] = field(default_factory=list)  # opening -> final answer known
    post_statuses: Counter[int] = field(default_factory=Counter)
    get_statuses: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # buyers that never got a place
    transport_errors: int = 0
    request_ids: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


async def run_load(
    url: str,
    event_id: str,
    ticket_type_id: str,
    buyer_tokens: list[str],
    args: argparse.Namespace,
    load: Load,
    on_open: Any,
) -> tuple[Tracker, Lanes]:
    load.request_ids = [""] * len(buyer_tokens)
    load.positions = [0] * len(buyer_tokens)
    tracker = Tracker()
    lanes = Lanes(url, args.connections, args.own_sockets)
    await lanes.open()
    watchers = [
        asyncio.create_task(tracker.watch(url, event_id)) for _ in range(max(0, args.sockets))
    ]
    body = msgspec.json.encode(
        {
            "event_id": event_id,
            "ticket_type_id": ticket_type_id,
            "quantity": 1,
            "payment": {"method": "card", "token": "tok_visa"},
        }
    )
    go = asyncio.Event()
    rng = random.Random(5)

    async def buyer(n: int) -> None:
        auth = b"Authorization: Bearer %s\r\n" % buyer_tokens[n].encode()
        post = auth + b"Content-Type: application/json\r\nIdempotency-Key: headline-%d\r\n" % n
        await go.wait()
        if args.arrival > 0:
            await asyncio.sleep(args.arrival * n / len(buyer_tokens))
        while True:
            # The counter as known when the request leaves: never ahead of the one the door
            # computes the position from, so position + served never overshoots the place.
            served, resets = tracker.served, tracker.resets
            try:
                status, answer, wire = await lanes.request(n, "POST", "/bookings", post, body)
            except (OSError, TimeoutError, ValueError):
                load.transport_errors += 1
                await asyncio.sleep(0.5 + rng.random())
                continue
            load.post_statuses[status] += 1
            if status == 202:
                break
            if status in (429, 502, 503, 504):  # sent again, same key: never a second booking
                await asyncio.sleep(1.0 + rng.random())
                continue
            code = _decode_error(answer).error.code if answer.startswith(b"{") else ""
            load.refused[f"{status} {code}".strip()] += 1
            return
        queued = _decode_queued(answer)
        placed = time.perf_counter()
        load.placed += 1
        load.last_placed = placed
        load.enqueue_wire.append(wire)
        load.to_place.append(placed - load.opened)
        load.request_ids[n] = queued.request_id
        load.positions[n] = queued.position
        path = f"/bookings/requests/{queued.request_id}"
        # A counter that restarted meanwhile makes the place unknown: ask at once.
        place = queued.position + served if tracker.resets == resets else 0
        pause = 0.25
        while True:
            await tracker.wait_for(place)
            served, resets = tracker.served, tracker.resets
            try:
                status, answer, _ = await lanes.request(n, "GET", path, auth)
            except (OSError, TimeoutError, ValueError):
                load.transport_errors += 1
                place = 0
                await asyncio.sleep(0.5 + rng.random())
                continue
            load.get_statuses[status] += 1
            if status != 200:  # asked again after the pause, whatever the counter says
                place = 0
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)
                continue
            found = _decode_status(answer)
            if found.status in ("confirmed", "failed", "cancelled"):
                outcome = found.status
                if found.error is not None:
                    outcome += f" {found.error.code}"
                load.outcomes[outcome] += 1
                load.finals += 1
                load.last_final = time.perf_counter()
                load.to_final.append(load.last_final - load.opened)
                return
            if found.status == "queued" and found.position:
                place = found.position + served if tracker.resets == resets else 0
                continue
            place = 0  # being processed: its answer is moments away
            await asyncio.sleep(pause)
            pause = min(2 * pause, 2.0)

    tasks = [asyncio.create_task(buyer(n)) for n in range(len(buyer_tokens))]
    await asyncio.sleep(0.5)  # every buyer waiting at the door, the sockets subscribed
    on_open()
    load.opened, load.opened_wall = time.perf_counter(), time.time()
    go.set()
    try:
        done, _ = await asyncio.wait(tasks, timeout=args.timeout)
        load.timed_out = len(done) < len(tasks)
    finally:
        load.ended = time.perf_counter()
        for task in (*tasks, *watchers):
            task.cancel()
        await asyncio.gather(*tasks, *watchers, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                load.refused[f"failed: {task.exception()!r}"] += 1
        lanes.close()
    return tracker, lanes


# --- sampling -----------------------------------------------------------------------------------


@dataclass
class Series:
    t: list[float] = field(default_factory=list)  # seconds since the opening
    tickets: list[int] = field(default_factory=list)  # places given (Redis counter)
    served: list[int] = field(default_factory=list)  # places served (Redis counter)
    sold: list[int] = field(default_factory=list)  # tickets sold (PostgreSQL)
    placed: list[int] = field(default_factory=list)  # buyers answered 202 (client side)
    finals: list[int] = field(default_factory=list)  # buyers told their outcome
    process_t: list[float] = field(default_factory=list)
    rss: dict[str, list[float]] = field(default_factory=dict)  # role -> MiB (PSS: postgresql)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # role -> CPU seconds so far


async def sample(
    series: Series,
    load: Load,
    processes: Processes,
    redis_url: str,
    database_url: str,
    event_id: str,
    ticket_type_id: str,
    total: int,
    stop: asyncio.Event,
) -> None:
    """Every half second the queue's counters and the tickets sold; every second the processes;
    a progress line every few seconds. Until ``stop``, then once more."""
    redis = Redis.from_url(redis_url)
    conn = await db.connect(database_url)
    names = [keys.queue_ticket(event_id), keys.queue_served(event_id)]
    roles = processes.roles()
    next_process = next_progress = 0.0
    try:
        while True:
            now = time.perf_counter() - load.opened if load.opened else 0.0
            try:
                ticket, served = (int(v or 0) for v in await redis.mget(names))
            except (OSError, RedisError):  # Redis away (a restart): the counters as they were
                ticket = series.tickets[-1] if series.tickets else 0
                served = series.served[-1] if series.served else 0
            try:
                sold = await conn.fetchval(
                    "SELECT sold FROM ticket_types WHERE id = $1", ticket_type_id
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if conn.is_closed():
                    conn = await db.connect(database_url)
                sold = series.sold[-1] if series.sold else 0
            series.t.append(round(now, 3))
            series.tickets.append(ticket)
            series.served.append(served)
            series.sold.append(int(sold))
            series.placed.append(load.placed)
            series.finals.append(load.finals)
            if now >= next_process:
                next_process = now + PROCESS_EVERY
                if len(series.process_t) % 10 == 0:
                    roles = processes.roles()  # backends come and go
                usage = processes.sample(roles)
                series.process_t.append(round(now, 3))
                for role, u in usage.items():
                    series.rss.setdefault(role, []).append(
                        round((u.pss if role == "postgresql" else u.rss) / 2**20, 1)
                    )
                    series.cpu.setdefault(role, []).append(round(u.cpu, 2))
            if load.opened and now >= next_progress:
                next_progress = now + PROGRESS_EVERY
                print(
                    f"  {now:6.1f} s  placed {load.placed:>7,}/{total:,}  served "
                    f"{served:>7,}  depth {ticket - served:>7,}  "
                    f"sold {int(sold):>6,}  told {load.finals:>7,}",
                    flush=True,
                )
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
                await asyncio.sleep(0.2)  # the last answers' counters, then the last sample
    finally:
        await conn.close()
        await redis.aclose()


# --- order --------------------------------------------------------------------------------------


@dataclass
class Order:
    confirmed: int
    sold_beyond: int  # confirmed with a place past the number of tickets
    unsold_within: int  # places within the number of tickets not confirmed
    inverted_pairs: float  # fraction of pairs of confirmed bookings in the other order
    max_displacement: int  # |rank by confirmation time - rank by place|
    p99_displacement: int
    max_overtaking: int  # places between you and someone behind you confirmed before you
    reserve_overtaking: int  # the same with the time each booking's units were reserved
    beyond_fast: int  # overtaken beyond the window though their own charge was fast
    beyond_slow: int  # overtaken beyond the window while their own charge took long
    missing_places: int  # confirmed bookings whose place Redis no longer had

    @property
    def within_window(self) -> bool:
        return self.beyond_fast == 0 and self.reserve_overtaking == 0


def _overtaken(pairs: list[tuple[int, float]]) -> list[int]:
    """For each (place, time), in the order given: how many places behind it was the furthest
    one among those with a strictly earlier time (0 when none was behind it)."""
    order = sorted(range(len(pairs)), key=lambda k: (pairs[k][1], pairs[k][0]))
    result = [0] * len(pairs)
    best_before = -1
    group: list[int] = []
    last: float | None = None
    for k in order:
        place, at = pairs[k]
        if at != last:
            best_before = max([best_before, *group])
            group, last = [], at
        group.append(place)
        result[k] = max(0, best_before - place)
    return result


def order_of(
    places: dict[str, int],
    confirmed_at: dict[str, float],
    seats: int,
    reserved_at: dict[str, float] | None = None,
    window: int = IN_FLIGHT * BATCH,
) -> Order:
    """How far the confirmations' order strays from the order of the places."""
    reserved_at = reserved_at or {}
    ids = [b for b in confirmed_at if b in places]
    known = [(places[b], confirmed_at[b]) for b in ids]
    missing = len(confirmed_at) - len(known)
    by_place = sorted(known)
    n = len(by_place)
    # Inverted pairs: for each booking in order of place, the earlier places confirmed strictly
    # later (a Fenwick tree over the ranks of the confirmation times).
    times = sorted({at for _, at in by_place})
    rank = {at: i + 1 for i, at in enumerate(times)}
    tree = [0] * (len(times) + 1)
    inverted = 0
    for seen, (_, at) in enumerate(by_place):
        r = rank[at]
        not_later = 0
        i = r
        while i > 0:
            not_later += tree[i]
            i -= i & -i
        inverted += seen - not_later
        i = r
        while i <= len(times):
            tree[i] += 1
            i += i & -i
    # Displacement: rank by confirmation time (ties in place order) minus rank by place.
    by_time = sorted(range(n), key=lambda k: (by_place[k][1], by_place[k][0]))
    displacement = sorted(abs(t - k) for t, k in enumerate(by_time))
    overtaken = _overtaken(known)
    beyond = [b for b, o in zip(ids, overtaken, strict=True) if o > window]
    slow = [b for b in beyond if confirmed_at[b] - reserved_at.get(b, confirmed_at[b]) > SLOW]
    reserved = [(places[b], reserved_at[b]) for b in ids if b in reserved_at]
    return Order(
        confirmed=len(confirmed_at),
        sold_beyond=sum(1 for place, _ in known if place > seats),
        unsold_within=seats - sum(1 for place, _ in known if place <= seats),
        inverted_pairs=inverted / (n * (n - 1) / 2) if n > 1 else 0.0,
        max_displacement=displacement[-1] if displacement else 0,
        p99_displacement=displacement[min(n - 1, int(0.99 * n))] if displacement else 0,
        max_overtaking=max(overtaken, default=0),
        reserve_overtaking=max(_overtaken(reserved), default=0),
        beyond_fast=len(beyond) - len(slow),
        beyond_slow=len(slow),
        missing_places=missing,
    )


_STEP_AT = """extract(epoch FROM (SELECT (h ->> 'at')::timestamptz
                                   FROM jsonb_array_elements(b.history) h
                                   WHERE h ->> 'to' = '{state}' LIMIT 1))"""


async def read_order(
    database_url: str,
    redis_url: str,
    event_id: str,
    request_ids: list[str],
    seats: int,
    window: int,
) -> Order:
    conn = await db.connect(database_url)
    try:
        rows = await conn.fetch(
            f"""SELECT b.id::text, {_STEP_AT.format(state="CONFIRMED")} AS confirmed,
                       {_STEP_AT.format(state="PAYMENT_PENDING")} AS reserved
                FROM bookings b WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED'""",
            event_id,
        )
    finally:
        await conn.close()
    confirmed_at = {r["id"]: float(r["confirmed"]) for r in rows if r["confirmed"] is not None}
    reserved_at = {r["id"]: float(r["reserved"]) for r in rows if r["reserved"] is not None}
    ids = [i for i in request_ids if i]
    places: dict[str, int] = {}
    redis = Redis.from_url(redis_url)
    try:
        for start in range(0, len(ids), 5000):
            chunk = ids[start : start + 5000]
            async with redis.pipeline(transaction=False) as pipe:
                for request_id in chunk:
                    pipe.hget(keys.booking_request(request_id), "ticket")
                found = await pipe.execute()
            places.update((i, int(t)) for i, t in zip(chunk, found, strict=True) if t)
    finally:
        await redis.aclose()
    return order_of(places, confirmed_at, seats, reserved_at, window)


_GA_CHECKS = {
    "sold": "SELECT sold FROM ticket_types WHERE id = $2 AND event_id = $1",
    "held": "SELECT held FROM ticket_types WHERE id = $2 AND event_id = $1",
    "items": """
        SELECT count(*) FROM booking_items i JOIN bookings b ON b.id = i.booking_id
        WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED' AND i.ticket_type_id = $2""",
    "tickets": """
        SELECT count(*) FROM tickets WHERE event_id = $1 AND ticket_type_id = $2
        AND status <> 'void'""",
    "bookings": "SELECT count(*) FROM bookings WHERE event_id = $1 AND $2::uuid IS NOT NULL",
}


# verify's checks that compare sold seats with items and tickets: every item and ticket of
# this sale has no seat, so they count them all; the checks below stand in for them.
SEAT_ONLY = {
    "sold seats not matching a confirmed booking's item",
    "valid tickets not matching a sold seat",
}
GA_LABELS = {
    "sold": "tickets sold (the ticket type's counter)",
    "items": "items of confirmed bookings",
    "tickets": "valid tickets",
    "held": "units still held",
}


async def ga_counts(database_url: str, event_id: str, ticket_type_id: str) -> dict[str, int]:
    conn = await db.connect(database_url)
    try:
        return {
            name: int(await conn.fetchval(sql, event_id, ticket_type_id))
            for name, sql in _GA_CHECKS.items()
        }
    finally:
        await conn.close()


async def flushes(redis_url: str) -> int | None:
    """How many FLUSHALLs the Redis server has run so far (None: INFO refused)."""
    redis = Redis.from_url(redis_url)
    try:
        stats: Any = await redis.info("commandstats")
    except Exception:
        return None
    finally:
        await redis.aclose()
    found = stats.get("cmdstat_flushall")
    return int(found["calls"]) if isinstance(found, dict) else 0


async def forget_requests(redis_url: str, request_ids: list[str]) -> None:
    """The statuses of requests that never became bookings (a run cut short)."""
    redis = Redis.from_url(redis_url)
    try:
        names = [keys.booking_request(i) for i in request_ids if i]
        for start in range(0, len(names), 1000):
            await redis.delete(*names[start : start + 1000])
    finally:
        await redis.aclose()


# --- reporting ----------------------------------------------------------------------------------


def histogram(values: list[float]) -> dict[str, list[float] | list[int]]:
    """Seconds into counts over :data:`HISTOGRAM_EDGES_MS` (the last bucket is open-ended)."""
    counts = [0] * (len(HISTOGRAM_EDGES_MS) + 1)
    for v in values:
        counts[bisect.bisect_right(HISTOGRAM_EDGES_MS, v * 1000)] += 1
    return {"edges_ms": [round(e, 3) for e in HISTOGRAM_EDGES_MS], "counts": counts}


def first_time(series: Series, values: list[int], goal: int) -> float | None:
    for t, v in zip(series.t, values, strict=True):
        if v >= goal:
            return t
    return None


def peak_rate(t: list[float], values: list[int], span: float = 2.0) -> float:
    """The highest rate of a counter over ``span`` seconds."""
    best = 0.0
    j = 0
    for i in range(len(t)):
        while t[i] - t[j] > span:
            j += 1
        if t[i] - t[j] >= span / 2:
            best = max(best, (values[i] - values[j]) / (t[i] - t[j]))
    return best


def report(
    args: argparse.Namespace,
    layout: Layout,
    load: Load,
    tracker: Tracker,
    lanes: Lanes,
    series: Series,
    verdict: Any,
    ga: dict[str, int],
    order: Order,
    processes: Processes,
    busy: float,
    nginx_errors: Counter[str],
    flushed: int | None,
) -> tuple[dict[str, Any], bool]:
    buyers, seats = args.buyers, args.seats
    window = in_flight(args.env) * BATCH
    wall = load.ended - load.opened
    sold_at = first_time(series, series.sold, seats)
    drained_at = first_time(series, series.served, load.placed) if load.placed else None
    placed_in = load.last_placed - load.opened if load.placed else 0.0
    served_rate = load.placed / drained_at if drained_at else 0.0
    sold_rate = seats / sold_at if sold_at else 0.0
    gets = sum(load.get_statuses.values())
    posts = sum(load.post_statuses.values())
    ok_checks = (
        not any(n for name, n in verdict.counts.items() if name not in SEAT_ONLY)
        and ga["sold"] == ga["items"] == ga["tickets"] == seats
        and ga["held"] == 0
    )
    # Once the worker found the tickets gone, the door answers later buyers 409 sold_out at
    # once (bilten.queue.UNITS_LEFT_TTL_MS): told their outcome without a place.
    at_door = load.refused.get("409 sold_out", 0)
    everyone = load.placed + at_door == buyers and load.finals == load.placed
    print(f"\nheadline: {buyers:,} buyers, {seats:,} tickets, {layout.describe()} behind nginx")
    print(
        f"  places   {load.placed:,}/{buyers:,} buyers got a place (202) in {placed_in:.1f} s"
        f"{'' if load.placed + at_door == buyers else '  NOT EVERY BUYER'}; refused "
        + (", ".join(f"{k} {v}" for k, v in load.refused.items()) or "none")
    )
    print(
        f"  enqueue  request written -> 202: p50 {percentile(load.enqueue_wire, 0.5):.1f} ms, "
        f"p99 {percentile(load.enqueue_wire, 0.99):.1f} ms; opening -> place: p50 "
        f"{percentile(load.to_place, 0.5):.0f} ms, p99 {percentile(load.to_place, 0.99):.0f} ms"
        f" (includes waiting for one of {args.connections} connections)"
        if load.enqueue_wire
        else "  enqueue  no request was placed"
    )
    print(
        f"  sold     {ga['sold']:,}/{seats:,} tickets"
        + (f", sold out {sold_at:.1f} s after the opening" if sold_at else ", NOT sold out")
        + (f" = {sold_rate:,.0f} bookings/s" if sold_rate else "")
        + f" (peak {peak_rate(series.t, series.sold):,.0f}/s over 2 s)"
    )
    print(
        f"  served   {series.served[-1] if series.served else 0:,} places"
        + (
            f", the last {drained_at:.1f} s after the opening = {served_rate:,.0f} places/s"
            if drained_at
            else ", the queue NOT drained"
        )
        + f" (peak {peak_rate(series.t, series.served):,.0f}/s); peak depth "
        f"{max((a - b for a, b in zip(series.tickets, series.served, strict=True)), default=0):,}"
    )
    print(
        f"  told     {load.finals + at_door:,}/{buyers:,} buyers their outcome"
        f" ({at_door:,} sold out at the door): "
        + ", ".join(f"{k} {v:,}" for k, v in load.outcomes.most_common())
        + (
            f"; opening -> outcome p50 {percentile(load.to_final, 0.5) / 1000:.1f} s, "
            f"p99 {percentile(load.to_final, 0.99) / 1000:.1f} s"
            if load.to_final
            else ""
        )
    )
    print(
        f"  requests POST {posts:,} ({dict(sorted(load.post_statuses.items()))}), GET {gets:,} "
        f"({gets / max(1, load.placed):.2f} per buyer, {dict(sorted(load.get_statuses.items()))})"
        f"; transport errors {load.transport_errors}; connections opened {lanes.connects:,}; "
        f"queue.served messages {tracker.messages:,} (socket reconnects {tracker.reconnects}"
        + (f", counter restarted {tracker.resets} time(s)" if tracker.resets else "")
        + ")"
    )
    print("checks (PostgreSQL):")
    for name, count in verdict.counts.items():
        if name in SEAT_ONLY:
            continue
        print(f"  {name:<50} {count:>7}   {'ok' if count == 0 else 'FAILED'}")
    for name, label in GA_LABELS.items():
        want = 0 if name == "held" else seats
        print(f"  {label:<50} {ga[name]:>7}   {'ok' if ga[name] == want else 'FAILED'}")
    print(
        f"  bookings {ga['bookings']:,}: confirmed {verdict.confirmed:,}, failed {verdict.failed:,}"
        + (f" ({dict(verdict.failures.most_common())})" if verdict.failures else "")
    )
    print("order (place = the queue ticket drawn at the door; confirmation = its history step):")
    print(
        f"  sold beyond the first {seats:,} places {order.sold_beyond}, places within them "
        f"not sold {order.unsold_within}; reserved out of order by at most "
        f"{order.reserve_overtaking} places; confirmations: pairs inverted "
        f"{order.inverted_pairs:.2%}, displacement max {order.max_displacement}, p99 "
        f"{order.p99_displacement}, overtaken by at most {order.max_overtaking} places"
    )
    print(
        f"  window {window:,} places ({window // BATCH} x {BATCH} requests in hand at once): "
        + (
            "every booking within it"
            if not (order.beyond_fast or order.beyond_slow)
            else f"{order.beyond_slow} booking(s) beyond it while their own charge took over "
            f"{SLOW:g} s (by design: a slow charge holds up only its own booking), "
            f"{order.beyond_fast} with a fast one"
        )
        + ("" if order.within_window else "  FAILED")
        + (f"; {order.missing_places} places unknown" if order.missing_places else "")
    )
    cores = os.cpu_count() or 1
    print(f"processes (memory sampled every {PROCESS_EVERY:g} s; CPU over the {wall:.1f} s run):")
    roles_summary: dict[str, dict[str, float]] = {}
    if processes.samples:
        last = processes.samples[-1][1]
        for role in last:
            peaks = [
                s[role].pss if role == "postgresql" else s[role].rss
                for _, s in processes.samples
                if role in s
            ]
            # Summed step by step: a process replaced meanwhile (a restarted Redis) starts again
            # from zero, and that step is left out rather than counted negative.
            used = [s[role].cpu for _, s in processes.samples if role in s]
            cpu = sum(max(0.0, b - a) for a, b in itertools.pairwise(used))
            roles_summary[role] = {
                "peak_mib": round(max(peaks) / 2**20, 1),
                "mean_mib": round(sum(peaks) / len(peaks) / 2**20, 1),
                "cpu_seconds": round(cpu, 2),
                "processes": last[role].processes,
            }
            kind = "PSS" if role == "postgresql" else "RSS"
            print(
                f"  {role:<22} {kind} peak {mib(max(peaks)):>9}, mean "
                f"{mib(sum(peaks) / len(peaks)):>9}; CPU {cpu:6.1f} s "
                f"({100 * cpu / max(wall, 1e-9):4.0f}% of a core)"
                + (f"; {last[role].processes} processes" if last[role].processes > 1 else "")
            )
    share = busy / max(cores * wall, 1e-9)
    print(f"  machine busy {busy:.1f} CPU s of {cores * wall:.1f} ({share:.0%} of {cores} cores)")
    if nginx_errors:
        print(
            f"nginx error log ({sum(nginx_errors.values()):,} lines): "
            + "; ".join(f"{n:,} x {m}" for m, n in nginx_errors.most_common(4))
        )
    lost = any(b < a for a, b in itertools.pairwise(series.served))
    if lost or flushed:
        print(
            "WARNING: Redis lost the queue during the run (its counter went back: a restart, "
            "or a flush"
            + (f"; FLUSHALL was called {flushed} time(s) meanwhile" if flushed else "")
            + "). Recovery queued the accepted requests again from PostgreSQL, so the checks "
            "still hold, but the timings and the order figures are not an undisturbed run's."
        )
    fair = order.sold_beyond == 0 and order.within_window
    passed = everyone and ok_checks and fair and not load.timed_out
    print(
        f"summary: {load.placed:,}/{buyers:,} places, {ga['tickets']:,}/{seats:,} sold"
        + (f" in {sold_at:.1f} s ({sold_rate:,.0f} bookings/s)" if sold_at else "")
        + (f", queue drained at {served_rate:,.0f} places/s" if drained_at else "")
        + f", enqueue p50/p99 {percentile(load.enqueue_wire, 0.5):.0f}/"
        f"{percentile(load.enqueue_wire, 0.99):.0f} ms, overtaken by at most "
        f"{order.max_overtaking} places; {'PASSED' if passed else 'FAILED'}"
        + ("; TIMED OUT" if load.timed_out else "")
    )
    figures = {
        "buyers": buyers,
        "seats": seats,
        "placed": load.placed,
        "told": load.finals + at_door,
        "sold_out_at_door": at_door,
        "placed_in_s": round(placed_in, 3),
        "enqueue_p50_ms": round(percentile(load.enqueue_wire, 0.5), 2)
        if load.enqueue_wire
        else None,
        "enqueue_p99_ms": round(percentile(load.enqueue_wire, 0.99), 2)
        if load.enqueue_wire
        else None,
        "to_place_p50_ms": round(percentile(load.to_place, 0.5), 1) if load.to_place else None,
        "to_place_p99_ms": round(percentile(load.to_place, 0.99), 1) if load.to_place else None,
        "sold": ga["tickets"],
        "sold_out_s": sold_at,
        "bookings_per_s": round(sold_rate, 1),
        "bookings_per_s_peak": round(peak_rate(series.t, series.sold), 1),
        "drained_s": drained_at,
        "served_per_s": round(served_rate, 1),
        "served_per_s_peak": round(peak_rate(series.t, series.served), 1),
        "peak_depth": max(
            (a - b for a, b in zip(series.tickets, series.served, strict=True)), default=0
        ),
        "get_per_buyer": round(gets / max(1, load.placed), 3),
        "outcomes": dict(load.outcomes),
        "sold_beyond": order.sold_beyond,
        "inverted_pairs": order.inverted_pairs,
        "max_displacement": order.max_displacement,
        "p99_displacement": order.p99_displacement,
        "max_overtaking": order.max_overtaking,
        "reserve_overtaking": order.reserve_overtaking,
        "beyond_window_fast": order.beyond_fast,
        "beyond_window_slow_charge": order.beyond_slow,
        "window": window,
        "checks_ok": ok_checks,
        "passed": passed,
        "timed_out": load.timed_out,
        "machine_busy_share": round(busy / max(cores * wall, 1e-9), 3),
        "processes": roles_summary,
        "nginx_errors": dict(nginx_errors.most_common(10)),
        "redis_lost_queue": lost or bool(flushed),
    }
    return figures, passed


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0]
        + " Needs nginx (Debian: apt-get install nginx) and PostgreSQL and Redis from "
        "BILTEN_DATABASE_URL / BILTEN_REDIS_URL (else embedded ones).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--buyers", type=int, default=100_000, help="buyers, each asking for one ticket"
    )
    parser.add_argument("--seats", type=int, default=5_000, help="tickets on sale")
    parser.add_argument(
        "--layout",
        default="2+1",
        help="N: N instances with every role; N+M: N api,realtime instances and M workers ones",
    )
    parser.add_argument(
        "--connections", type=int, default=2000, help="connections to nginx at most"
    )
    parser.add_argument(
        "--own-sockets",
        action="store_true",
        help="a connection per request from the buyer's own address, instead of a shared pool "
        "forwarding it",
    )
    parser.add_argument(
        "--sockets", type=int, default=4, help="WebSockets watching the queue counter"
    )
    parser.add_argument(
        "--arrival",
        type=float,
        default=0.0,
        help="seconds over which the buyers arrive (0: all at the opening)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="bound on the load, seconds")
    parser.add_argument("--nginx-workers", type=int, default=2, help="nginx worker processes")
    parser.add_argument(
        "--nginx-access-log",
        metavar="FILE",
        help="nginx logs every request here with its upstream's timings (else no access log)",
    )
    parser.add_argument("--defer-mail", action="store_true", help="keep mail queued during the run")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the instances, e.g. BILTEN_QUEUE_IN_FLIGHT=4",
    )
    parser.add_argument("--json", metavar="FILE", help="write the figures and series as JSON")
    args = parser.parse_args()
    try:
        args.parsed_layout = Layout.parse(args.layout)
    except ValueError as error:
        parser.error(str(error))
    if args.buyers < 1 or args.seats < 1 or args.connections < 1:
        parser.error("--buyers, --seats and --connections must be positive")
    return args


def instance_env(args: argparse.Namespace, data_dir: str) -> dict[str, str]:
    env = {
        "BILTEN_ACCESS_TOKEN_TTL": "3600",
        "BILTEN_DATA_DIR": data_dir,  # mail is written to files here, and thrown away
        "BILTEN_QUEUE_MAX": str(max(10_000, args.buyers + 1_000)),
    }
    if args.defer_mail:
        env["BILTEN_MAIL_POLL_INTERVAL"] = "3600"
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("BILTEN_"):
            raise SystemExit(f"--env wants BILTEN_NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        raise SystemExit(
            f"the fd limit is {hard}: {needed} are needed; lower --connections or raise ulimit -Hn"
        )


def run(
    args: argparse.Namespace, database_url: str, redis_url: str, data_dir: str
) -> tuple[dict[str, Any], bool, Series, Load]:
    layout: Layout = args.parsed_layout
    began = time.perf_counter()
    event_id, ticket_type_id = asyncio.run(make_sale(database_url, args.seats))
    buyer_ids = asyncio.run(make_buyers(database_url, args.buyers))
    secret_key = secrets.token_urlsafe(48)
    buyer_tokens = attendee_tokens(secret_key, buyer_ids)
    print(
        f"setup: event {event_id}, {args.buyers:,} buyers with their tokens; "
        f"{time.perf_counter() - began:.1f} s",
        flush=True,
    )
    load = Load()
    series = Series()
    try:
        with cluster(
            database_url,
            redis_url,
            layout,
            secret_key=secret_key,
            env=instance_env(args, data_dir),
            nginx_workers=args.nginx_workers,
            access_log=args.nginx_access_log,
        ) as running:
            print(
                f"cluster: nginx {running.url} (pid {running.nginx_pid}) -> "
                + ", ".join(f"{i.name} {i.roles} (pid {i.pid})" for i in running.instances),
                flush=True,
            )
            time.sleep(2.0)  # start-up over (the mail worker's child process imports)
            flushes_before = asyncio.run(flushes(redis_url))
            processes = Processes(
                {i.name: i.pid for i in running.instances},
                running.nginx_pid,
                urlsplit(database_url).path.lstrip("/"),
                redis_url,
            )
            load, tracker, lanes, busy = _load(
                args,
                running,
                event_id,
                ticket_type_id,
                buyer_tokens,
                processes,
                series,
                redis_url,
                database_url,
            )
            if load.timed_out:
                asyncio.run(wait_until_settled(database_url, event_id, 60))
            verdict = asyncio.run(verify(database_url, event_id))
            ga = asyncio.run(ga_counts(database_url, event_id, ticket_type_id))
            order = asyncio.run(
                read_order(
                    database_url,
                    redis_url,
                    event_id,
                    load.request_ids,
                    args.seats,
                    in_flight(args.env) * BATCH,
                )
            )
            flushed = asyncio.run(flushes(redis_url))
            if flushed is not None and flushes_before is not None:
                flushed -= flushes_before
            figures, passed = report(
                args,
                layout,
                load,
                tracker,
                lanes,
                series,
                verdict,
                ga,
                order,
                processes,
                busy,
                running.nginx.errors(),
                flushed,
            )
    finally:
        if os.environ.get("BILTEN_REDIS_URL"):
            asyncio.run(forget_in_redis(redis_url, database_url, event_id))
            asyncio.run(forget_requests(redis_url, load.request_ids))
    return figures, passed, series, load


def _load(
    args: argparse.Namespace,
    running: Cluster,
    event_id: str,
    ticket_type_id: str,
    buyer_tokens: list[str],
    processes: Processes,
    series: Series,
    redis_url: str,
    database_url: str,
) -> tuple[Load, Tracker, Lanes, float]:
    """The load on uvloop, sampled meanwhile; also the machine's busy CPU seconds during it."""
    load = Load()
    busy = [0.0]

    def opened() -> None:
        busy[0] = machine_busy()

    async def main() -> tuple[Tracker, Lanes]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(
            sample(
                series,
                load,
                processes,
                redis_url,
                database_url,
                event_id,
                ticket_type_id,
                args.buyers,
                stop,
            )
        )
        try:
            return await run_load(
                running.url, event_id, ticket_type_id, buyer_tokens, args, load, opened
            )
        finally:
            stop.set()
            try:
                await asyncio.wait_for(sampler, 30)
            except (asyncio.CancelledError, TimeoutError):
                pass
            except Exception as error:  # the run stands; only its samples stop early
                print(f"  sampling stopped early: {error!r}", flush=True)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        tracker, lanes = runner.run(main())
    return load, tracker, lanes, machine_busy() - busy[0]


def main() -> None:
    args = parse_args()
    raise_fd_limit(args.connections + args.sockets + 200)
    external = (
        "PostgreSQL "
        + ("external" if os.environ.get("BILTEN_DATABASE_URL") else "embedded")
        + ", Redis "
        + ("external" if os.environ.get("BILTEN_REDIS_URL") else "embedded")
    )
    print(
        f"headline: {args.buyers:,} buyers, {args.seats:,} tickets, layout {args.layout} "
        f"({args.parsed_layout.describe()}), {args.connections:,} "
        + ("connections of their own at most" if args.own_sockets else "pooled connections")
        + f", {args.sockets} WebSockets; mail {'deferred' if args.defer_mail else 'sent'}; "
        f"{external}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with services() as (database_url, redis_url), tempfile.TemporaryDirectory() as data_dir:
        figures, passed, series, load = run(args, database_url, redis_url, data_dir)
    if args.json:
        write_json(args, figures, series, load)
    if not passed:
        raise SystemExit(1)


def write_json(
    args: argparse.Namespace, figures: dict[str, Any], series: Series, load: Load
) -> None:
    document = {
        "bench": "headline",
        "config": {
            "buyers": args.buyers,
            "seats": args.seats,
            "layout": args.layout,
            "connections": args.connections,
            "own_sockets": args.own_sockets,
            "sockets": args.sockets,
            "mail": "deferred" if args.defer_mail else "sent",
            "env": args.env,
            "cores": os.cpu_count(),
        },
        "figures": figures,
        "series": {
            "queue": {
                "t": series.t,
                "values": {
                    "tickets": series.tickets,
                    "served": series.served,
                    "sold": series.sold,
                    "placed": series.placed,
                    "told": series.finals,
                },
            },
            "rss_mib": {"t": series.process_t, "values": series.rss},
            "cpu_seconds": {"t": series.process_t, "values": series.cpu},
        },
        "histograms": {
            "enqueue": histogram(load.enqueue_wire),
            "to_place": histogram(load.to_place),
            "to_outcome": histogram(load.to_final),
        },
    }
    Path(args.json).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
