"""WebSocket fan-out: N connections watching one event's seat map on one instance.

    python bench/ws_fanout.py [--connections 5000] [--changes 100] [--rate 10] [--burst 100]
                              [--processes 2] [--seats 50]

One ``bilten serve`` process; client processes open the connections (raw WebSocket framing on
uvloop, so the clients cost little next to the server) and subscribe to one room, each taking
the seat-map snapshot. Then, published to the room's Redis channel exactly as the outbox relay
publishes them:

* ``--changes`` seat deltas at ``--rate`` a second: latency from publish to each socket (p50,
  p99 over all deliveries) and to the last socket of each delta ("to all", p50, p99, max);
* ``--burst`` deltas at once: messages delivered per second to all sockets together.

Memory per idle connection is the server's RSS growth while the connections were opened,
divided by N. The server's fd limit is raised to its hard limit (10,000 connections need more
than the usual 1,024).
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
import sys
import time
from array import array
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import msgspec
import redis

from bench.common import bilten_process, services
from bench.read_path import make_event
from bilten import keys

BASE_VERSION = 1 << 40  # above any real seat version, so deltas are new to every client


class Head(msgspec.Struct):
    type: str
    version: int | None = None


_head = msgspec.json.Decoder(Head)


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
        transport.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: {self.swarm.host}\r\nUpgrade: websocket\r\n"
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

    def __init__(self, host: str, port: int, event_id: str) -> None:
        self.host = f"{host}:{port}"
        self.address = (host, port)
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
        self.arrivals: dict[int, array[float]] = {}
        self.deltas = 0

    def message(self, payload: bytes, now: float) -> None:
        head = _head.decode(payload)
        if head.type == "seats" and head.version is not None:
            times = self.arrivals.get(head.version)
            if times is None:
                times = self.arrivals[head.version] = array("d")
            times.append(now)
            self.deltas += 1
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


def client_process(pipe: Pipe, host: str, port: int, event_id: str, count: int) -> None:
    import uvloop

    async def main() -> None:
        swarm = Swarm(host, port, event_id)
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


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    def __init__(self, host: str, port: int, event_id: str) -> None:
        self.args = (host, port, event_id)
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

    def collect(self) -> tuple[dict[int, array[float]], dict[int, int], int, list[str]]:
        """Arrival times by version (and forget them), close codes, sockets lost, errors."""
        merged: dict[int, array[float]] = {}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--changes", type=int, default=100, help="deltas in the latency phase")
    parser.add_argument("--rate", type=float, default=10.0, help="deltas a second, latency phase")
    parser.add_argument("--burst", type=int, default=100, help="deltas at once, throughput phase")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--seats", type=int, default=50)
    args = parser.parse_args()
    n = args.connections
    raise_fd_limit(n + 200)
    ms = 1000.0
    with services() as (database_url, redis_url):
        event_id = asyncio.run(make_event(database_url, args.seats))
        env = {
            "BILTEN_ROLES": "api,realtime",
            "BILTEN_WS_IDLE_TIMEOUT": "3600",  # these clients never ping
            "BILTEN_WS_SEND_QUEUE": str(max(256, args.burst * 2)),
        }
        with bilten_process(database_url, redis_url, **env) as (url, server):
            host, port = url.removeprefix("http://").split(":")
            print(
                f"server           pid {server.pid}; machine load average "
                f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
                flush=True,
            )
            seats = [s["id"] for s in httpx.get(f"{url}/events/{event_id}/seats").json()["seats"]]
            publisher = redis.Redis.from_url(redis_url)
            channel = keys.seats_channel(event_id)
            clients = Clients(host, int(port), event_id)
            # One socket first, so the room and its snapshot exist before memory is measured.
            clients.open([1])
            time.sleep(1.0)
            before = proc_status(server.pid, "VmRSS")
            began = time.monotonic()
            shares = [n // args.processes + (i < n % args.processes) for i in range(args.processes)]
            errors = clients.open(shares)
            opened = time.monotonic() - began
            time.sleep(2.0)
            after = proc_status(server.pid, "VmRSS")
            total = clients.sockets
            print(
                f"connections      {total} open and subscribed (snapshot each) in {opened:.1f} s, "
                f"{args.processes} client processes" + (f"; errors {errors[:3]}" if errors else ""),
                flush=True,
            )
            print(
                f"server memory    {before / 1024:.0f} MiB -> {after / 1024:.0f} MiB: "
                f"{(after - before) / (total - 1):.1f} KiB per idle connection",
                flush=True,
            )

            # Latency: deltas at a steady rate, each timed from its publish.
            version = BASE_VERSION
            published: dict[int, float] = {}
            cpu = cpu_seconds(server.pid)
            start = time.monotonic()
            for i in range(args.changes):
                version += 1
                pause = start + i / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                published[version] = time.monotonic()
                publisher.publish(channel, delta(event_id, version, seats[i % len(seats)], "held"))
            clients.wait_for(args.changes * total, timeout=60)
            cpu = cpu_seconds(server.pid) - cpu
            arrivals, codes, lost, errors = clients.collect()
            each: list[float] = []
            to_all: list[float] = []
            to_first: list[float] = []
            missing = 0
            for v, sent in published.items():
                times = arrivals.get(v, array("d"))
                missing += total - len(times)
                if times:
                    each.extend(t - sent for t in times)
                    to_all.append(max(times) - sent)
                    to_first.append(min(times) - sent)
            print(
                f"latency          {args.changes} deltas at {args.rate:g}/s to {total} sockets: "
                f"per delivery p50 {percentile(each, 0.5) * ms:.1f} ms, "
                f"p99 {percentile(each, 0.99) * ms:.1f} ms; to all p50 "
                f"{percentile(to_all, 0.5) * ms:.1f} ms, p99 {percentile(to_all, 0.99) * ms:.1f} "
                f"ms, max {max(to_all, default=0) * ms:.1f} ms; to the first p50 "
                f"{percentile(to_first, 0.5) * ms:.1f} ms; missing {missing}; server CPU "
                f"{cpu / max(len(each), 1) * 1e6:.1f} µs per delivery",
                flush=True,
            )

            # Throughput: a burst in one pipeline, as the relay publishes a batch.
            first_version = version + 1
            cpu = cpu_seconds(server.pid)
            with publisher.pipeline(transaction=False) as pipe:
                for i in range(args.burst):
                    version += 1
                    pipe.publish(channel, delta(event_id, version, seats[i % len(seats)], "sold"))
                first = time.monotonic()
                pipe.execute()
            clients.wait_for(args.changes * total + args.burst * total, timeout=120)
            cpu = cpu_seconds(server.pid) - cpu
            arrivals, codes2, lost2, errors2 = clients.collect()
            burst = range(first_version, version + 1)
            delivered = sum(len(arrivals.get(v, ())) for v in burst)
            last = max((max(arrivals[v]) for v in burst if arrivals.get(v)), default=first)
            print(
                f"throughput       {args.burst} deltas at once to {total} sockets: {delivered} "
                f"delivered in {(last - first) * ms:.0f} ms = "
                f"{delivered / max(last - first, 1e-9):,.0f} messages/s; "
                f"missing {args.burst * total - delivered}; server CPU "
                f"{cpu / max(delivered, 1) * 1e6:.1f} µs per delivery",
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
