"""WebSocket fan-out: N connections watching one event's seat map on one instance.

    python bench/ws_fanout.py [--connections 5000] [--changes 100] [--rate 10] [--burst 100]
                              [--processes 2] [--seats 50] [--source redis|holds] [--auth]
                              [--idle-only] [--trace] [--json FILE]

One ``bilten serve`` process; client processes open the connections (raw WebSocket framing on
non-blocking sockets, so the clients cost little next to the server) and subscribe to one
room, each taking the seat-map snapshot; with ``--auth`` each connects with an access token of
its own user (so each also has a personal channel, as a signed-in browser does). Then:

* ``--changes`` seat changes at ``--rate`` a second: latency from each change to each socket
  (p50, p99 over all deliveries) and to the last socket of each change ("to all", p50, p99,
  max). ``--source redis`` publishes the deltas to the room's Redis channel as the outbox relay
  publishes them (the hub alone); ``--source holds`` makes them through the HTTP API, one
  user's ``POST /holds`` of a seat, or ``DELETE`` of its oldest hold once it holds four, each
  timed from the moment its request is sent: the API, the commit, the outbox relay, Redis and
  the hub, the whole way (and how long each request took to be answered);
* ``--burst`` deltas at once, published in one pipeline as the relay publishes a pass:
  messages delivered per second to all sockets together.

A delivery is timed when it reached its socket, by the kernel's receive timestamp
(``SO_TIMESTAMPNS``), and also when its client read it: the clients share the machine with the
server, and what they are late reading is their own backlog, not the server's. The clients
look at their sockets every millisecond rather than sleeping in ``epoll_wait``, so that the
server's writes do not wake them one message at a time. The CPU line gives the server's and
the clients' shares of a core.

Memory per idle connection is the server's RSS growth while the connections were opened,
divided by N (``--idle-only`` stops there). ``--trace`` runs the server under tracemalloc and
lists what the idle connections hold, per connection, by package and by allocation site, then
stops (tracemalloc slows the server down and adds to its RSS). The server's fd limit is raised
to its hard limit (10,000 connections need more than the usual 1,024). ``--json FILE`` writes
the figures and the latency histograms (at the socket, and as read) for ``bench/suite.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import resource
import secrets
import select
import shutil
import socket
import struct
import sys
import tempfile
import time
import tracemalloc
import uuid
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import msgspec
import redis

from bench.common import ROOT, bilten_process, services
from bench.read_path import make_event
from bilten import claimnews, db, keys, tokens, users
from bilten.settings import Settings

BASE_VERSION = 1 << 40  # above any real seat version, so deltas are new to every client
# Holds a user keeps open in the holds source: each is released a few changes after it was
# made, so a hold and its release never fall into one pass of the relay, which would publish
# only the seat's latest change.
OPEN_HOLDS = 4


class Change(msgspec.Struct):
    seat_id: str
    status: str


class Delta(msgspec.Struct):
    type: str
    version: int | None = None
    changes: list[Change] = []


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


# A socket option Python's socket module does not name (Linux, asm-generic): the kernel
# stamps each read with the time (CLOCK_REALTIME) its last data reached the socket.
SO_TIMESTAMPNS = 35
STAMP = struct.Struct("qq")  # struct timespec
STAMP_SPACE = socket.CMSG_SPACE(STAMP.size)
READ_SIZE = 65536
POLL = 0.001  # seconds between looks at the client sockets
POLL_EVENTS = 4096


class Client:
    """The least a WebSocket client can do: handshake, subscribe, time each seat delta.

    Read with ``recvmsg`` to get the kernel's receive time of what it reads, besides the time
    it reads it: the difference is this process's own backlog (the clients share the CPU with
    the server), which says nothing of the server's.
    """

    __slots__ = ("counted", "last", "open", "rest", "sock", "swarm")

    def __init__(self, swarm: Swarm, sock: socket.socket) -> None:
        self.swarm = swarm
        self.sock = sock
        self.rest = b""  # the start of a frame not yet complete
        self.open = False
        # Counting only (Swarm.count_only), once subscribed: bytes since, and when the last of
        # them reached the socket.
        self.counted = -1
        self.last = 0.0

    def start(self) -> None:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        self.sock.send(
            (
                f"GET {self.swarm.path()} HTTP/1.1\r\nHost: {self.swarm.host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.swarm.watch(self)

    def close(self) -> None:
        self.swarm.unwatch(self)
        self.sock.close()

    def readable(self) -> None:
        swarm = self.swarm
        try:
            size, ancillary, _, _ = self.sock.recvmsg_into(swarm.buffers, STAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size, ancillary = 0, []
        now = time.time()
        if not size:
            self.close()
            swarm.lost(self)
            return
        stamp = now
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = STAMP.unpack_from(raw)
                stamp = seconds + nanoseconds * 1e-9
        self.received(bytes(swarm.buffers[0][:size]), stamp, now)

    def received(self, data: bytes, stamp: float, now: float) -> None:
        if self.counted >= 0:
            self.counted += len(data)
            self.last = stamp
            return
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
            self.sock.send(self.swarm.subscribe)
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
                message(data[start:end], stamp, now)
                if self.swarm.count_only and data[start:end].startswith(b'{"type":"subscribed"'):
                    self.counted = size - end  # from here on only counted
                    self.last = stamp
                    return
            elif opcode == 9:
                self.sock.send(_control(0xA, data[start:end]))
            elif opcode == 8:
                code = int.from_bytes(data[start : start + 2], "big") if length >= 2 else 1005
                self.swarm.closed_by_server(code)
            at = end
        if at < size:
            self.rest = data[at:]


@dataclass(frozen=True)
class Target:
    """Where the client sockets connect, and how they subscribe."""

    host: str
    port: int
    event_id: str
    by_seat: bool = False  # arrivals by "seat status" of each change, not by version
    secret: str | None = None  # each socket its own user: a token signed with the server's key
    # Past its subscription, a socket's frames are only counted (bytes, and when the last
    # came), not parsed: for watchers by the ten thousand beside a load on the same cores.
    count_only: bool = False
    indexed: bool = False  # seats named by index ("indexed": true)
    version: int | None = None  # the seat map's, read beforehand as a page does: no snapshot


class Swarm:
    """This process's share of the connections, and what they saw."""

    def __init__(self, target: Target) -> None:
        self.host = f"{target.host}:{target.port}"
        self.count_only = target.count_only
        self.address = (target.host, target.port)
        self.by_seat = target.by_seat
        self.signer = tokens.signer(Settings(secret_key=target.secret)) if target.secret else None
        subscribe: dict[str, Any] = {"type": "subscribe", "room": f"event:{target.event_id}"}
        subscribe |= {"indexed": True} if target.indexed else {}
        subscribe |= {"version": target.version} if target.version is not None else {}
        self.subscribe = _mask(json.dumps(subscribe).encode())
        self.clients: list[Client] = []
        self.ready = 0
        self.subscribed: asyncio.Event = asyncio.Event()
        self.expected = 0
        self.errors: list[str] = []
        self.close_codes: dict[int, int] = {}
        self.lost_count = 0
        # By delta, as received (the same bytes reach every socket, so each is decoded once):
        # when it reached each socket (the kernel's stamp), and when it was read.
        self.arrivals: dict[bytes, tuple[array[float], array[float]]] = {}
        self.changes: dict[bytes, list[int | str]] = {}  # what each delta tells
        self.deltas = 0
        self.buffer = bytearray(READ_SIZE)  # every socket reads into it (one thread)
        self.buffers = [memoryview(self.buffer)]
        # The sockets are looked at every POLL seconds, not waited on: a client asleep
        # between looks is not woken by each write, which would cost the server (whose write
        # does the waking) and this process a switch per message on a shared CPU. What is
        # measured is unchanged: the kernel stamps each arrival.
        self.poller = select.epoll()
        self.by_fd: dict[int, Client] = {}

    def watch(self, client: Client) -> None:
        fd = client.sock.fileno()
        self.by_fd[fd] = client
        self.poller.register(fd, select.EPOLLIN)

    def unwatch(self, client: Client) -> None:
        fd = client.sock.fileno()
        if self.by_fd.get(fd) is client:
            del self.by_fd[fd]
            with contextlib.suppress(OSError, ValueError):
                self.poller.unregister(fd)

    async def pump(self) -> None:
        """Read every socket that has something, every POLL seconds."""
        poll = self.poller.poll
        by_fd = self.by_fd
        while True:
            while True:
                ready = poll(0, POLL_EVENTS)
                for fd, _ in ready:
                    client = by_fd.get(fd)
                    if client is None:
                        continue
                    try:
                        client.readable()
                    except Exception as exc:  # one socket's trouble, not every socket's
                        self.errors.append(repr(exc))
                        client.close()
                if len(ready) < POLL_EVENTS:
                    break
            await asyncio.sleep(POLL)

    def path(self) -> str:
        if self.signer is None:
            return "/ws"
        return "/ws?token=" + self.signer.issue(str(uuid.uuid4()), "attendee", uuid.uuid4().hex)

    def report(self) -> dict[int | str, tuple[bytes, bytes]]:
        """Arrival times by change ("seat status") or by version (and forget them)."""
        merged: dict[int | str, tuple[array[float], array[float]]] = {}
        for payload, (stamps, reads) in self.arrivals.items():
            for key in self.changes[payload]:
                into = merged.setdefault(key, (array("d"), array("d")))
                into[0].extend(stamps)
                into[1].extend(reads)
        self.arrivals.clear()
        return {key: (s.tobytes(), r.tobytes()) for key, (s, r) in merged.items()}

    def message(self, payload: bytes, stamp: float, now: float) -> None:
        times = self.arrivals.get(payload)
        if times is not None:
            times[0].append(stamp)
            times[1].append(now)
            self.deltas += len(self.changes[payload])
            return
        head = _delta.decode(payload)
        if head.type == "seats" and head.version is not None:
            if payload not in self.changes:
                self.changes[payload] = (
                    [f"{change.seat_id} {change.status}" for change in head.changes]
                    if self.by_seat
                    else [head.version]
                )
            self.arrivals[payload] = (array("d", [stamp]), array("d", [now]))
            self.deltas += len(self.changes[payload])
        elif head.type in claimnews.TYPES:
            # News of seats claimed by a sale's queued bookings: each frame timed as a change.
            self.changes[payload] = ["news " + hashlib.blake2b(payload, digest_size=8).hexdigest()]
            self.arrivals[payload] = (array("d", [stamp]), array("d", [now]))
            self.deltas += 1
        elif head.type == "subscribed":
            self.settle()
        elif head.type == "error":
            self.errors.append(payload[:200].decode())

    def settle(self) -> None:
        """One more socket subscribed, or given up on."""
        self.ready += 1
        if self.ready >= self.expected:
            self.subscribed.set()

    def failed(self, client: Client, answer: bytes) -> None:
        self.errors.append(answer.decode(errors="replace"))
        client.close()
        self.settle()

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
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                try:
                    await loop.sock_connect(sock, self.address)
                except OSError as exc:
                    sock.close()
                    self.errors.append(repr(exc))
                    self.settle()
                    return
                client = Client(self, sock)
                self.clients.append(client)
                try:
                    client.start()
                except OSError as exc:
                    client.close()
                    self.errors.append(repr(exc))
                    self.settle()

        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.wait_for(self.subscribed.wait(), 120)


def client_process(pipe: Pipe, target: Target, count: int) -> None:
    import uvloop

    async def main() -> None:
        swarm = Swarm(target)
        pump = asyncio.ensure_future(swarm.pump())
        try:
            await swarm.connect(count)
        except TimeoutError:
            swarm.errors.insert(0, f"{count - swarm.ready} sockets not subscribed in time")
        gc.collect()
        pipe.send(("ready", len(swarm.clients), swarm.errors[:5]))
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command == "count":
                pipe.send(swarm.deltas)
            elif command == "counted":  # each socket's bytes since subscribed, and their last
                pipe.send([(c.counted, c.last) for c in swarm.clients])
            elif command == "report":
                arrivals = swarm.report()
                cpu = resource.getrusage(resource.RUSAGE_SELF)
                pipe.send(
                    (
                        arrivals,
                        swarm.close_codes,
                        swarm.lost_count,
                        swarm.errors[:5],
                        (cpu.ru_utime, cpu.ru_stime),
                    )
                )
            elif command == "quit":
                pump.cancel()
                for client in swarm.clients:
                    client.close()
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


@dataclass
class Collected:
    """Arrival times by version or change: when each reached a socket (the kernel's stamp)
    and when its client read it; close codes; sockets lost; errors; the clients' CPU seconds
    so far (all their processes together)."""

    stamps: dict[Any, array[float]] = field(default_factory=dict)
    reads: dict[Any, array[float]] = field(default_factory=dict)
    codes: dict[int, int] = field(default_factory=dict)
    lost: int = 0
    errors: list[str] = field(default_factory=list)
    cpu: float = 0.0
    cpu_kernel: float = 0.0


class Clients:
    """The client processes, driven over pipes."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.context = multiprocessing.get_context("spawn")
        self.pipes: list[Pipe] = []
        self.processes: list[Any] = []
        self.sockets = 0

    def open(self, shares: list[int]) -> list[str]:
        """Start one process per share; returns once every socket is subscribed."""
        started = []
        for count in shares:
            parent, child = self.context.Pipe()
            process = self.context.Process(target=client_process, args=(child, self.target, count))
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

    def collect(self) -> Collected:
        """What the sockets saw since the last time (and forget it)."""
        got = Collected()
        for pipe in self.pipes:
            pipe.send("report")
        for pipe in self.pipes:
            arrivals, close_codes, lost_count, failed, cpu = pipe.recv()
            for key, (stamps, reads) in arrivals.items():
                for raw, into in ((stamps, got.stamps), (reads, got.reads)):
                    times = array("d")
                    times.frombytes(raw)
                    into.setdefault(key, array("d")).extend(times)
            for code, n in close_codes.items():
                got.codes[code] = got.codes.get(code, 0) + n
            got.lost += lost_count
            got.errors += failed
            got.cpu += sum(cpu)
            got.cpu_kernel += cpu[1]
        return got

    def counted(self) -> list[tuple[int, float]]:
        """Counting only: each socket's bytes since it subscribed, and when the last came."""
        for pipe in self.pipes:
            pipe.send("counted")
        return [each for pipe in self.pipes for each in pipe.recv()]

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


# Histogram bucket edges (ms), as bench/suite.py plots them: ten a decade, 1 ms to 10 s.
EDGES_MS = [round(10 ** (k / 10), 3) for k in range(41)]


def histogram(values: list[float]) -> dict[str, list[float] | list[int]]:
    """Latencies (seconds) counted in EDGES_MS buckets (``counts`` has one more: below the
    first edge, and at or above the last)."""
    counts = [0] * (len(EDGES_MS) + 1)
    for value in values:
        counts[bisect.bisect_right(EDGES_MS, value * 1000.0)] += 1
    return {"edges_ms": EDGES_MS, "counts": counts}


def latency(
    sent: dict[Any, float], arrivals: dict[Any, array[float]], total: int
) -> tuple[list[float], list[float], list[float], int]:
    """Per delivery, to the last socket of each change, to the first; deliveries missing."""
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
    return each, to_all, to_first, missing


def report_latency(
    what: str,
    sent: dict[Any, float],
    got: Collected,
    total: int,
    cpu: tuple[float, float],
    seconds: float,
    figures: dict[str, Any],
    histograms: dict[str, Any],
) -> None:
    """Print the latency phase's figures, and keep them for --json.

    At the socket: the kernel's receive time of each delivery, what the server is measured
    by; read: when the client process read it, which adds its own backlog.
    """
    ms = 1000.0
    each, to_all, to_first, missing = latency(sent, got.stamps, total)
    read, read_all, _, _ = latency(sent, got.reads, total)
    print(
        f"latency          {what} to {total} sockets, at the socket: per delivery p50 "
        f"{percentile(each, 0.5) * ms:.1f} ms, p99 {percentile(each, 0.99) * ms:.1f} ms; to all "
        f"p50 {percentile(to_all, 0.5) * ms:.1f} ms, p99 {percentile(to_all, 0.99) * ms:.1f} "
        f"ms, max {max(to_all, default=0) * ms:.1f} ms; to the first p50 "
        f"{percentile(to_first, 0.5) * ms:.1f} ms; missing {missing}",
        flush=True,
    )
    print(
        f"                 as read by the clients: per delivery p50 "
        f"{percentile(read, 0.5) * ms:.1f} ms, p99 {percentile(read, 0.99) * ms:.1f} ms; to all "
        f"p99 {percentile(read_all, 0.99) * ms:.1f} ms",
        flush=True,
    )
    print(
        f"cpu              {cpu_text(cpu, len(each))}; server {sum(cpu) / seconds:.0%} of a core, "
        f"clients {got.cpu / seconds:.0%} ({got.cpu_kernel / max(got.cpu, 1e-9):.0%} in the "
        f"kernel; over {seconds:.1f} s)",
        flush=True,
    )
    figures.update(
        {
            "delivery_p50_ms": round(percentile(each, 0.5) * ms, 2),
            "delivery_p90_ms": round(percentile(each, 0.9) * ms, 2),
            "delivery_p99_ms": round(percentile(each, 0.99) * ms, 2),
            "to_all_p50_ms": round(percentile(to_all, 0.5) * ms, 2),
            "to_all_p99_ms": round(percentile(to_all, 0.99) * ms, 2),
            "to_all_max_ms": round(max(to_all, default=0) * ms, 2),
            "to_first_p50_ms": round(percentile(to_first, 0.5) * ms, 2),
            "read_p50_ms": round(percentile(read, 0.5) * ms, 2),
            "read_p99_ms": round(percentile(read, 0.99) * ms, 2),
            "read_to_all_p99_ms": round(percentile(read_all, 0.99) * ms, 2),
            "missing": missing,
            "server_us_per_delivery": round(sum(cpu) / max(len(each), 1) * 1e6, 2),
            "server_kernel_share": round(cpu[1] / max(sum(cpu), 1e-9), 3),
            "server_cpu_share": round(sum(cpu) / seconds, 3),
            "clients_cpu_share": round(got.cpu / seconds, 3),
            "goal_p99_ms": 250.0,
            "goal_met": percentile(each, 0.99) * ms < 250.0,
        }
    )
    histograms["delivery_at_socket"] = histogram(each)
    histograms["delivery_read"] = histogram(read)


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
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
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
            target = Target(host, int(port), event_id, holds, secret if args.auth else None)
            clients = Clients(target)
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
            figures: dict[str, Any] = {
                "connections": total,
                "connect_seconds": round(opened, 2),
                "kib_per_connection": round((after - before) / (total - 1), 2),
            }
            histograms: dict[str, Any] = {}
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
                if args.json:
                    write_json(args.json, args, figures, histograms)
                return

            # Latency: changes at a steady rate, each timed from its start (wall-clock time,
            # as the kernel stamps what reaches the sockets).
            baseline = clients.collect()
            cpu = cpu_seconds(server.pid)
            start = time.monotonic()
            sent: dict[Any, float] = {}
            answered: list[float] = []  # how long each hold or release took to be answered
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
                    sent[version] = time.time()
                    publisher.publish(
                        channel, delta(event_id, version, seats[i % len(seats)], "held")
                    )
                elif len(held) < OPEN_HOLDS:
                    seat = next(fresh)
                    sent[f"{seat} held"] = time.time()
                    made = api.post("/holds", json={"event_id": event_id, "seat_ids": [seat]})
                    answered.append(time.time() - sent[f"{seat} held"])
                    if made.status_code != 201:
                        raise SystemExit(f"POST /holds answered {made.status_code}: {made.text}")
                    held.append((made.json()["id"], seat))
                else:
                    hold_id, seat = held.popleft()
                    sent[f"{seat} available"] = time.time()
                    gone = api.delete(f"/holds/{hold_id}")
                    answered.append(time.time() - sent[f"{seat} available"])
                    if gone.status_code != 204:
                        raise SystemExit(f"DELETE /holds answered {gone.status_code}: {gone.text}")
            clients.wait_for(args.changes * total, timeout=60)
            cpu = cpu_since(server.pid, cpu)
            seconds = time.monotonic() - start
            got = clients.collect()
            got.cpu -= baseline.cpu
            got.cpu_kernel -= baseline.cpu_kernel
            kind = "holds and releases" if holds else "deltas"
            what = f"{args.changes} {kind} at {args.rate:g}/s"
            report_latency(what, sent, got, total, cpu, seconds, figures, histograms)
            if answered:
                figures["hold_answered_p50_ms"] = round(percentile(answered, 0.5) * 1000, 2)
                figures["hold_answered_p99_ms"] = round(percentile(answered, 0.99) * 1000, 2)
                print(
                    f"holds            answered p50 {figures['hold_answered_p50_ms']:.1f} ms, "
                    f"p99 {figures['hold_answered_p99_ms']:.1f} ms (201 or 204)",
                    flush=True,
                )

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
                first = time.time()
                pipe.execute()
            clients.wait_for(args.changes * total + args.burst * total, timeout=120)
            cpu = cpu_since(server.pid, cpu)
            burst = clients.collect()
            delivered = sum(len(burst.stamps.get(k, ())) for k in keys_sent)
            last = max(
                (max(burst.stamps[k]) for k in keys_sent if burst.stamps.get(k)), default=first
            )
            rate = delivered / max(last - first, 1e-9)
            read = max(
                (max(burst.reads[k]) for k in keys_sent if burst.reads.get(k)), default=first
            )
            read_rate = delivered / max(read - first, 1e-9)
            print(
                f"throughput       {args.burst} deltas at once to {total} sockets: {delivered} "
                f"delivered in {(last - first) * 1000:.0f} ms = {rate:,.0f} messages/s "
                f"(read by the clients in {(read - first) * 1000:.0f} ms = {read_rate:,.0f}/s); "
                f"missing {args.burst * total - delivered}; " + cpu_text(cpu, delivered),
                flush=True,
            )
            figures["burst_messages_per_s"] = round(rate)
            figures["burst_read_messages_per_s"] = round(read_rate)
            figures["burst_missing"] = args.burst * total - delivered
            figures["burst_server_us_per_delivery"] = round(sum(cpu) / max(delivered, 1) * 1e6, 3)
            codes = dict(Counter(got.codes) + Counter(burst.codes))
            for code, count in sorted(codes.items()):
                print(f"closed           {count} sockets by the server with {code}", flush=True)
            trouble = got.errors + burst.errors
            if got.lost or burst.lost or trouble:
                print(f"trouble          lost {got.lost + burst.lost}; {trouble[:3]}", flush=True)
            peak = proc_status(server.pid, "VmHWM") / 1024
            print(f"server peak      {peak:.0f} MiB RSS", flush=True)
            figures.update(
                server_peak_mib=round(peak),
                closed={str(code): count for code, count in codes.items()},
                lost=got.lost + burst.lost,
            )
            clients.close()
    if args.json:
        write_json(args.json, args, figures, histograms)


def write_json(
    path: str, args: argparse.Namespace, figures: dict[str, Any], histograms: dict[str, Any]
) -> None:
    """The figures as bench/suite.py reads them (its BENCH schema)."""
    document = {
        "bench": "ws_fanout",
        "config": {
            "connections": args.connections,
            "changes": args.changes,
            "rate": args.rate,
            "burst": args.burst,
            "processes": args.processes,
            "source": args.source,
            "auth": args.auth,
        },
        "figures": figures,
        "histograms": histograms,
        "latency_ms": {
            name: {
                "p50": figures[f"{prefix}_p50_ms"],
                "p90": figures.get(f"{prefix}_p90_ms"),
                "p99": figures[f"{prefix}_p99_ms"],
            }
            for name, prefix in (("delta at the socket", "delivery"), ("delta read", "read"))
            if f"{prefix}_p50_ms" in figures
        },
    }
    Path(path).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
