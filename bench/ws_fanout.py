"""WebSocket fan-out: N connections watching one event's seat map on one instance.

    python bench/ws_fanout.py [--connections 5000] [--changes 100] [--rate 10] [--burst 100]
                              [--processes 2] [--seats 50] [--source redis|holds] [--auth]
                              [--idle-only] [--trace]

One ``bilten serve`` process; client processes open the connections (raw WebSocket framing on
uvloop, so the clients cost little next to the server) and subscribe to one room, each taking
the seat-map snapshot; with ``--auth`` each connects with an access token of its own user (so
each also has a personal channel, as a signed-in browser does). Then:

* ``--changes`` seat changes at ``--rate`` a second: latency from each change to each socket
  (p50, p99 over all deliveries) and to the last socket of each change ("to all", p50, p99,
  max). ``--source redis`` publishes the deltas to the room's Redis channel as the outbox relay
  publishes them (the hub alone); ``--source holds`` makes them through the HTTP API, one
  user's ``POST /holds`` of a seat, or ``DELETE`` of its oldest hold once it holds four, each
  timed from the moment its request is sent: the API, the commit, the outbox relay, Redis and
  the hub, the whole way;
* ``--burst`` deltas at once, published in one pipeline as the relay publishes a pass:
  messages delivered per second to all sockets together.

Memory per idle connection is the server's RSS growth while the connections were opened,
divided by N (``--idle-only`` stops there). ``--trace`` runs the server under tracemalloc and
lists what the idle connections hold, per connection, by package and by allocation site, then
stops (tracemalloc slows the server down and adds to its RSS). The server's fd limit is raised
to its hard limit (10,000 connections need more than the usual 1,024).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import multiprocessing
import os
import resource
import secrets
import shutil
import sys
import tempfile
import time
import tracemalloc
import uuid
from array import array
from collections import Counter, deque
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import msgspec
import redis

from bench.common import ROOT, bilten_process, services
from bench.read_path import make_event
from bilten import db, keys, tokens, users
from bilten.settings import Settings

BASE_VERSION = 1 << 40  # above any real seat version, so deltas are new to every client
# Holds a user keeps open in the holds source: each is released a few changes after it was
# made, so a hold and its release never fall into one pass of the relay, which would publish
# only the seat's latest change.
OPEN_HOLDS = 4


class Head(msgspec.Struct):
    type: str
    version: int | None = None


class Change(msgspec.Struct):
    seat_id: str
    status: str


class Delta(msgspec.Struct):
    type: str
    changes: list[Change] = []


_head = msgspec.json.Decoder(Head)
_delta = msgspec.json.Decoder(Delta)


def _mask(payload: bytes) -> bytes:
    """A client frame (FIN, text, masked); payloads under 126 bytes."""
    assert len(payload) < 126
    key = secrets.token_bytes(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + key + masked


def _control(opcode: int, payload: bytes) -> bytes:
    key = secrets.token_bytes(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + masked


class Client(asyncio.Protocol):
    """The least a WebSocket client can do: handshake, subscribe, time each seat delta."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.rest = b""  # the start of a frame not yet complete
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        path = self.swarm.path()
        transport.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {self.swarm.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.rest:
            data = self.rest + data
            self.rest = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.rest = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self.swarm.failed(self, data[:200])
                return
            data = data[end + 4 :]
            self.open = True
            assert self.transport is not None
            self.transport.write(self.swarm.subscribe)
        at = 0
        size = len(data)
        message = self.swarm.message
        while size - at >= 2:
            length = data[at + 1] & 0x7F
            start = at + 2
            if length == 126:
                if size - at < 4:
                    break
                length = int.from_bytes(data[at + 2 : at + 4], "big")
                start = at + 4
            elif length == 127:
                if size - at < 10:
                    break
                length = int.from_bytes(data[at + 2 : at + 10], "big")
                start = at + 10
            end = start + length
            if end > size:
                break
            opcode = data[at] & 0x0F
            if opcode == 1:
                message(data[start:end], now)
            elif opcode == 9 and self.transport is not None:
                self.transport.write(_control(0xA, data[start:end]))
            elif opcode == 8:
                code = int.from_bytes(data[start : start + 2], "big") if length >= 2 else 1005
                self.swarm.closed_by_server(code)
            at = end
        if at < size:
            self.rest = data[at:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.swarm.lost(self)


class Swarm:
    """This process's share of the connections, and what they saw."""

    def __init__(
        self, host: str, port: int, event_id: str, by_seat: bool, secret: str | None
    ) -> None:
        self.host = f"{host}:{port}"
        self.address = (host, port)
        self.by_seat = by_seat  # arrivals by "seat status" of each change, not by version
        # Each socket its own user: a token signed with the server's key.
        self.signer = tokens.signer(Settings(secret_key=secret)) if secret else None
        self.subscribe = _mask(
            json.dumps({"type": "subscribe", "room": f"event:{event_id}"}).encode()
        )
        self.clients: list[Client] = []
        self.ready = 0
        self.subscribed: asyncio.Event = asyncio.Event()
        self.expected = 0
        self.errors: list[str] = []
        self.close_codes: dict[int, int] = {}
        self.lost_count = 0
        self.arrivals: dict[int | str, array[float]] = {}
        self.deltas = 0

    def path(self) -> str:
        if self.signer is None:
            return "/ws"
        return "/ws?token=" + self.signer.issue(str(uuid.uuid4()), "attendee", uuid.uuid4().hex)

    def arrived(self, key: int | str, now: float) -> None:
        times = self.arrivals.get(key)
        if times is None:
            times = self.arrivals[key] = array("d")
        times.append(now)
        self.deltas += 1

    def message(self, payload: bytes, now: float) -> None:
        head = _head.decode(payload)
        if head.type == "seats" and head.version is not None:
            if self.by_seat:
                for change in _delta.decode(payload).changes:
                    self.arrived(f"{change.seat_id} {change.status}", now)
            else:
                self.arrived(head.version, now)
        elif head.type == "subscribed":
            self.ready += 1
            if self.ready >= self.expected:
                self.subscribed.set()
        elif head.type == "error":
            self.errors.append(payload[:200].decode())

    def failed(self, client: Client, answer: bytes) -> None:
        self.errors.append(answer.decode(errors="replace"))
        if client.transport is not None:
            client.transport.close()

    def closed_by_server(self, code: int) -> None:
        self.close_codes[code] = self.close_codes.get(code, 0) + 1

    def lost(self, client: Client) -> None:
        self.lost_count += 1

    async def connect(self, count: int, parallel: int = 100) -> None:
        loop = asyncio.get_running_loop()
        self.expected = count
        gate = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with gate:
                try:
                    _, client = await loop.create_connection(lambda: Client(self), *self.address)
                except OSError as exc:
                    self.errors.append(repr(exc))
                    self.ready += 1
                    return
                self.clients.append(client)

        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.wait_for(self.subscribed.wait(), 120)


def client_process(
    pipe: Pipe,
    host: str,
    port: int,
    event_id: str,
    by_seat: bool,
    secret: str | None,
    count: int,
) -> None:
    import uvloop

    async def main() -> None:
        swarm = Swarm(host, port, event_id, by_seat, secret)
        await swarm.connect(count)
        gc.collect()
        pipe.send(("ready", len(swarm.clients), swarm.errors[:5]))
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command == "count":
                pipe.send(swarm.deltas)
            elif command == "report":
                arrivals = {v: t.tobytes() for v, t in swarm.arrivals.items()}
                pipe.send((arrivals, swarm.close_codes, swarm.lost_count, swarm.errors[:5]))
                swarm.arrivals.clear()
            elif command == "quit":
                for client in swarm.clients:
                    if client.transport is not None:
                        client.transport.close()
                await asyncio.sleep(0.5)
                return

    uvloop.run(main())


def raise_fd_limit(needed: int) -> None:
    """For this process and, inherited, the server and the client processes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        raise SystemExit(f"the fd limit is {hard}: {needed} connections need more (ulimit -Hn)")


def proc_status(pid: int, field: str) -> int:
    """A figure of /proc/<pid>/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_since(pid: int, before: tuple[float, float]) -> tuple[float, float]:
    user, system = cpu_seconds(pid)
    return user - before[0], system - before[1]


def cpu_text(cpu: tuple[float, float], deliveries: int) -> str:
    """Server CPU per delivery, and the kernel's share of it (loopback TCP is counted here)."""
    total = sum(cpu)
    return (
        f"server CPU {total / max(deliveries, 1) * 1e6:.1f} µs per delivery "
        f"({cpu[1] / max(total, 1e-9):.0%} in the kernel)"
    )


def delta(event_id: str, version: int, seat_id: str, status: str) -> bytes:
    """A seat-map delta as the outbox relay publishes it."""
    return json.dumps(
        {
            "type": "seats",
            "event_id": event_id,
            "version": version,
            "changes": [{"seat_id": seat_id, "status": status, "version": version}],
        }
    ).encode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Clients:
    """The client processes, driven over pipes."""

    def __init__(
        self, host: str, port: int, event_id: str, by_seat: bool, secret: str | None
    ) -> None:
        self.args = (host, port, event_id, by_seat, secret)
        self.context = multiprocessing.get_context("spawn")
        self.pipes: list[Pipe] = []
        self.processes: list[Any] = []
        self.sockets = 0

    def open(self, shares: list[int]) -> list[str]:
        """Start one process per share; returns once every socket is subscribed."""
        started = []
        for count in shares:
            parent, child = self.context.Pipe()
            process = self.context.Process(target=client_process, args=(child, *self.args, count))
            process.start()
            started.append(parent)
            self.processes.append(process)
        errors: list[str] = []
        for pipe in started:
            _, count, failed = pipe.recv()
            self.sockets += count
            errors += failed
        self.pipes += started
        return errors

    def wait_for(self, deliveries: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pipe in self.pipes:
                pipe.send("count")
            if sum(pipe.recv() for pipe in self.pipes) >= deliveries:
                return
            time.sleep(0.1)

    def collect(self) -> tuple[dict[Any, array[float]], dict[int, int], int, list[str]]:
        """Arrival times by version or change (and forget them), close codes, sockets lost,
        errors."""
        merged: dict[Any, array[float]] = {}
        codes: dict[int, int] = {}
        lost = 0
        errors: list[str] = []
        for pipe in self.pipes:
            pipe.send("report")
        for pipe in self.pipes:
            arrivals, close_codes, lost_count, failed = pipe.recv()
            for version, raw in arrivals.items():
                times = array("d")
                times.frombytes(raw)
                merged.setdefault(version, array("d")).extend(times)
            for code, n in close_codes.items():
                codes[code] = codes.get(code, 0) + n
            lost += lost_count
            errors += failed
        return merged, codes, lost, errors

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send("quit")
        for process in self.processes:
            process.join(30)


# Put on the server's PYTHONPATH by --trace: a thread that waits for a request file naming a
# file, starts tracing allocations if it has not, and dumps a snapshot to that file. (Tracing
# from the start would make the server's imports take half a minute.)
_SITECUSTOMIZE = """
import gc, os, threading, time, tracemalloc

def _serve(request, frames):
    while True:
        time.sleep(0.1)
        if os.path.exists(request):
            with open(request) as f:
                target = f.read().strip()
            os.unlink(request)
            if not tracemalloc.is_tracing():
                tracemalloc.start(frames)
            gc.collect()
            tracemalloc.take_snapshot().dump(target + ".part")
            os.rename(target + ".part", target)

if os.environ.get("BENCH_TRACE_REQUEST"):
    threading.Thread(
        target=_serve,
        args=(os.environ["BENCH_TRACE_REQUEST"], int(os.environ["BENCH_TRACE_FRAMES"])),
        daemon=True,
    ).start()
"""
TRACE_FRAMES = 12


class Tracer:
    """Snapshots of the server's Python allocations, taken by the thread above; allocations
    are traced from the first snapshot on."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ws_fanout_trace_"))
        (self.folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        self.request = self.folder / "request"

    def env(self) -> dict[str, str]:
        return {
            "PYTHONPATH": str(self.folder),
            "BENCH_TRACE_REQUEST": str(self.request),
            "BENCH_TRACE_FRAMES": str(TRACE_FRAMES),
        }

    def snapshot(self, name: str) -> tracemalloc.Snapshot:
        target = self.folder / f"{name}.snapshot"
        self.request.write_text(str(target))
        deadline = time.monotonic() + 120
        while not target.exists():
            if time.monotonic() > deadline:
                raise SystemExit("the server took no tracemalloc snapshot")
            time.sleep(0.1)
        return tracemalloc.Snapshot.load(str(target))


def _owner(frames: tracemalloc.Traceback) -> tracemalloc.Frame:
    """The most recent frame of a package or of Bilten (not of the standard library): whose
    object the memory is, even when a deque or a dict of the standard library holds it."""
    for frame in reversed(frames):
        if "site-packages" in frame.filename or f"{os.sep}bilten{os.sep}" in frame.filename:
            return frame
    return frames[-1]


def _short(filename: str) -> str:
    """``uvicorn/protocols/...py``, ``bilten/realtime/hub.py``, ``asyncio/queues.py``."""
    for marker in ("site-packages/", f"{ROOT}/", "/lib/python3."):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            return rest.split("/", 1)[-1] if marker == "/lib/python3." else rest
    return filename


def _package(filename: str) -> str:
    name = _short(filename)
    if name.startswith("bilten/"):
        return name.removesuffix(".py")
    if "site-packages" in filename:
        return name.split("/", 1)[0].removesuffix(".py")
    return "standard library"


def trace_report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int) -> None:
    """What the idle connections added, per connection: by package, then by site."""
    diffs = [d for d in after.compare_to(before, "traceback") if d.size_diff]
    total = sum(d.size_diff for d in diffs)
    by_package: Counter[str] = Counter()
    by_site: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    for d in diffs:
        owner = _owner(d.traceback)
        inner = d.traceback[-1]
        site = f"{_short(owner.filename)}:{owner.lineno}"
        if inner is not owner:
            site += f" ({_short(inner.filename)}:{inner.lineno})"
        by_package[_package(owner.filename)] += d.size_diff
        by_site[site] += d.size_diff
        blocks[site] += d.count_diff
    print(
        f"traced memory    {total / n / 1024:.1f} KiB per idle connection of Python allocations "
        f"({n} connections)",
        flush=True,
    )
    for name, size in by_package.most_common():
        if abs(size) / n >= 16:
            print(f"  {size / n:8.0f} B  {name}", flush=True)
    print("  by site (the owning package's line, and the allocation's own):", flush=True)
    for site, size in by_site.most_common(60):
        print(f"  {size / n:8.0f} B  {blocks[site] / n:5.1f} blocks  {site}", flush=True)


async def hold_user(database_url: str) -> str:
    conn = await db.connect(database_url)
    try:
        user = await users.create(
            conn,
            email=f"holder-{uuid.uuid4().hex[:8]}@bench.test",
            password_hash="x",
            name="Holder",
            role="attendee",
        )
        return str(user.id)
    finally:
        await conn.close()


def report_latency(
    what: str,
    sent: dict[Any, float],
    arrivals: dict[Any, array[float]],
    total: int,
    cpu: tuple[float, float],
) -> None:
    each: list[float] = []
    to_all: list[float] = []
    to_first: list[float] = []
    missing = 0
    for key, at in sent.items():
        times = arrivals.get(key, array("d"))
        missing += total - len(times)
        if times:
            each.extend(t - at for t in times)
            to_all.append(max(times) - at)
            to_first.append(min(times) - at)
    ms = 1000.0
    print(
        f"latency          {what} to {total} sockets: per delivery p50 "
        f"{percentile(each, 0.5) * ms:.1f} ms, p99 {percentile(each, 0.99) * ms:.1f} ms; to all "
        f"p50 {percentile(to_all, 0.5) * ms:.1f} ms, p99 {percentile(to_all, 0.99) * ms:.1f} "
        f"ms, max {max(to_all, default=0) * ms:.1f} ms; to the first p50 "
        f"{percentile(to_first, 0.5) * ms:.1f} ms; missing {missing}; " + cpu_text(cpu, len(each)),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--changes", type=int, default=100, help="changes in the latency phase")
    parser.add_argument("--rate", type=float, default=10.0, help="changes a second, latency phase")
    parser.add_argument("--burst", type=int, default=100, help="deltas at once, throughput phase")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--seats", type=int, default=50)
    parser.add_argument(
        "--source",
        choices=("redis", "holds"),
        default="redis",
        help="latency phase: deltas published to Redis, or holds made through the HTTP API",
    )
    parser.add_argument("--auth", action="store_true", help="each socket signed in as its user")
    parser.add_argument("--idle-only", action="store_true", help="stop after the memory figure")
    parser.add_argument("--trace", action="store_true", help="tracemalloc breakdown, then stop")
    args = parser.parse_args()
    n = args.connections
    holds = args.source == "holds"
    raise_fd_limit(n + 200)
    seats_needed = max(args.seats, args.changes // 2 + OPEN_HOLDS if holds else 0)
    with services() as (database_url, redis_url):
        event_id = asyncio.run(make_event(database_url, -(-seats_needed // 25) * 25))
        secret = secrets.token_urlsafe(48)
        env = {
            "BILTEN_ROLES": "api,realtime,workers" if holds else "api,realtime",
            "BILTEN_WS_IDLE_TIMEOUT": "3600",  # these clients never ping
            "BILTEN_WS_SEND_QUEUE": str(max(256, args.burst * 2)),
            "BILTEN_WS_MAX_PER_IP": str(n + 100),  # every client comes from 127.0.0.1
            "BILTEN_LIMIT_API_IP": "0/60",
            "BILTEN_ACCESS_TOKEN_TTL": "3600",
        }
        tracer = Tracer() if args.trace else None
        if tracer is not None:
            env.update(tracer.env())
        with bilten_process(database_url, redis_url, secret_key=secret, **env) as (url, server):
            host, port = url.removeprefix("http://").split(":")
            print(
                f"server           pid {server.pid}; machine load average "
                f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
                + ("; tracing allocations" if tracer else ""),
                flush=True,
            )
            seats = [s["id"] for s in httpx.get(f"{url}/events/{event_id}/seats").json()["seats"]]
            clients = Clients(host, int(port), event_id, holds, secret if args.auth else None)
            # One socket first, so the room and its snapshot exist before memory is measured.
            clients.open([1])
            time.sleep(1.0)
            before = proc_status(server.pid, "VmRSS")
            traced = tracer.snapshot("before") if tracer else None
            began = time.monotonic()
            shares = [n // args.processes + (i < n % args.processes) for i in range(args.processes)]
            errors = clients.open(shares)
            opened = time.monotonic() - began
            time.sleep(2.0)
            after = proc_status(server.pid, "VmRSS")
            total = clients.sockets
            print(
                f"connections      {total} open and subscribed (snapshot each) in {opened:.1f} s, "
                f"{args.processes} client processes"
                + (", each its own user" if args.auth else ", anonymous")
                + (f"; errors {errors[:3]}" if errors else ""),
                flush=True,
            )
            print(
                f"server memory    {before / 1024:.0f} MiB -> {after / 1024:.0f} MiB: "
                f"{(after - before) / (total - 1):.1f} KiB per idle connection (RSS)",
                flush=True,
            )
            if tracer is not None and traced is not None:
                trace_report(traced, tracer.snapshot("after"), total - 1)
                shutil.rmtree(tracer.folder, ignore_errors=True)
            if args.idle_only or tracer is not None:
                clients.close()
                return

            # Latency: changes at a steady rate, each timed from its start.
            cpu = cpu_seconds(server.pid)
            start = time.monotonic()
            sent: dict[Any, float] = {}
            version = BASE_VERSION
            publisher = redis.Redis.from_url(redis_url)
            channel = keys.seats_channel(event_id)
            if holds:
                user_id = asyncio.run(hold_user(database_url))
                signer = tokens.signer(Settings(secret_key=secret, access_token_ttl=3600))
                auth = {"Authorization": f"Bearer {signer.issue(user_id, 'attendee', 'bench')}"}
                api = httpx.Client(base_url=url, headers=auth, timeout=30)
                held: deque[tuple[str, str]] = deque()  # open holds: id, seat
                fresh = iter(seats)
            for i in range(args.changes):
                pause = start + i / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                if not holds:
                    version += 1
                    sent[version] = time.monotonic()
                    publisher.publish(
                        channel, delta(event_id, version, seats[i % len(seats)], "held")
                    )
                elif len(held) < OPEN_HOLDS:
                    seat = next(fresh)
                    sent[f"{seat} held"] = time.monotonic()
                    made = api.post("/holds", json={"event_id": event_id, "seat_ids": [seat]})
                    if made.status_code != 201:
                        raise SystemExit(f"POST /holds answered {made.status_code}: {made.text}")
                    held.append((made.json()["id"], seat))
                else:
                    hold_id, seat = held.popleft()
                    sent[f"{seat} available"] = time.monotonic()
                    gone = api.delete(f"/holds/{hold_id}")
                    if gone.status_code != 204:
                        raise SystemExit(f"DELETE /holds answered {gone.status_code}: {gone.text}")
            clients.wait_for(args.changes * total, timeout=60)
            cpu = cpu_since(server.pid, cpu)
            arrivals, codes, lost, errors = clients.collect()
            kind = "holds and releases" if holds else "deltas"
            what = f"{args.changes} {kind} at {args.rate:g}/s"
            report_latency(what, sent, arrivals, total, cpu)

            # Throughput: a burst in one pipeline, as the relay publishes a batch.
            burst_seats = seats[: max(1, len(seats) - 1)]
            cpu = cpu_seconds(server.pid)
            keys_sent: list[Any] = []
            with publisher.pipeline(transaction=False) as pipe:
                for i in range(args.burst):
                    version += 1
                    seat = burst_seats[i % len(burst_seats)]
                    pipe.publish(channel, delta(event_id, version, seat, f"sold{i}"))
                    keys_sent.append(f"{seat} sold{i}" if holds else version)
                first = time.monotonic()
                pipe.execute()
            clients.wait_for(args.changes * total + args.burst * total, timeout=120)
            cpu = cpu_since(server.pid, cpu)
            arrivals, codes2, lost2, errors2 = clients.collect()
            delivered = sum(len(arrivals.get(k, ())) for k in keys_sent)
            last = max((max(arrivals[k]) for k in keys_sent if arrivals.get(k)), default=first)
            print(
                f"throughput       {args.burst} deltas at once to {total} sockets: {delivered} "
                f"delivered in {(last - first) * 1000:.0f} ms = "
                f"{delivered / max(last - first, 1e-9):,.0f} messages/s; "
                f"missing {args.burst * total - delivered}; " + cpu_text(cpu, delivered),
                flush=True,
            )
            for code, count in sorted({**codes, **codes2}.items()):
                print(f"closed           {count} sockets by the server with {code}", flush=True)
            if lost or lost2 or errors or errors2:
                print(f"trouble          lost {lost + lost2}; {(errors + errors2)[:3]}", flush=True)
            print(
                f"server peak      {proc_status(server.pid, 'VmHWM') / 1024:.0f} MiB RSS",
                flush=True,
            )
            clients.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
