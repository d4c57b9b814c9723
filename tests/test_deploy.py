"""deploy/: the operator's files, run for real.

deploy/nginx.conf (its upstream lines and listen address replaced, nothing else) runs in a real
nginx in front of three ``bilten serve`` instances that trust it. Through it: the booking flow,
live seat maps over a WebSocket, a WebSocket that outlives the restart of its instance, and a
rolling restart of every instance while buyers book. compose.yaml and the systemd unit are
checked as far as this machine can (no container runtime: their structure; systemd-analyze
when present).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import websockets
from websockets.asyncio.client import connect

from bilten import db
from bilten.settings import Settings
from tests.conftest import ROOT, TEST_SECRET, free_port, server_env, wait_ready
from tests.test_bookings import buyer, published_event
from tests.test_proxies import client_from, started_nginx

pytestmark = pytest.mark.slow

DEPLOY = ROOT / "deploy"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")

FAST = dict(
    BILTEN_ARGON2_TIME_COST="1",
    BILTEN_ARGON2_MEMORY_KIB="1024",
    BILTEN_ARGON2_PARALLELISM="1",
    BILTEN_LIMIT_REGISTER_IP="0/3600",
    BILTEN_LIMIT_API_IP="0/60",
    BILTEN_LOG_FORMAT="text",
    # As deploy/nginx.conf asks: the instances believe nginx's X-Forwarded-For.
    BILTEN_TRUSTED_PROXIES="127.0.0.1",
)
RETRY = {502, 503, 504}  # a client sends these again, with the same Idempotency-Key

# The process-level part that nginx.conf leaves to the host's own nginx.conf: deploy/nginx.conf
# is included inside http { }, as Debian's and the official image's nginx.conf do with conf.d/.
NGINX_MAIN = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$remote_addr "$request" $status upstream=$upstream_addr '
                        'upstream_status=$upstream_status time=$request_time';
    access_log {tmp}/access.log upstream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    proxy_max_temp_file_size 0;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/bilten.conf;
}}
"""


def render_nginx_conf(text: str, upstreams: list[str], listen: str) -> str:
    """deploy/nginx.conf with its instances and listen address replaced; the rest unchanged."""
    block = re.search(r"^upstream bilten \{\n(.*?)^\}", text, re.M | re.S)
    assert block, "deploy/nginx.conf has no `upstream bilten` block"
    lines = re.findall(r"^\s*server\s+(\S+)(.*);$", block.group(1), re.M)
    assert lines, "the upstream block lists no server"
    options = lines[0][1]  # max_fails, fail_timeout: what the file says, for every instance
    servers = "".join(f"    server {u.removeprefix('http://')}{options};\n" for u in upstreams)
    body = re.sub(r"^\s*server\s+\S+.*;\n", "", block.group(1), flags=re.M)
    body = re.sub(r"^(\s*least_conn;\n)", lambda m: m.group(1) + servers, body, flags=re.M)
    assert servers in body, "least_conn should come first in the upstream block"
    text = text[: block.start(1)] + body + text[block.end(1) :]
    text, listens = re.subn(r"^(\s*)listen 80;$", rf"\1listen {listen};", text, flags=re.M)
    assert listens == 1, "deploy/nginx.conf should listen on port 80 once"
    return text


@dataclass
class Instance:
    """One ``bilten serve`` that can be stopped and started again on the same port."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 40) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bilten", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        try:
            wait_ready(self.url, self.process, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal the process and wait for it to exit; its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"{self.name} did not stop within {timeout} s") from None
        return self.process.returncode

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def instance_id(self) -> str:
        """The id of the running process (the hello message's ``instance``), from its log."""
        found = re.findall(r"instance (\w+) started", self.log)
        assert found, self.log
        return found[-1]


@dataclass
class Cluster:
    url: str  # nginx
    instances: list[Instance]
    database_url: str
    folder: Path
    nginx_log: Callable[[], str] = field(repr=False, default=lambda: "")

    def by_id(self, instance_id: str) -> Instance:
        return next(i for i in self.instances if i.instance_id == instance_id)


@contextlib.contextmanager
def running_nginx(folder: Path, upstreams: list[str]) -> Iterator[str]:
    assert NGINX is not None
    port = free_port()
    listen = f"127.0.0.1:{port}"
    conf = render_nginx_conf((DEPLOY / "nginx.conf").read_text(), upstreams, listen)
    (folder / "bilten.conf").write_text(conf)
    main = folder / "nginx-main.conf"
    main.write_text(NGINX_MAIN.format(tmp=folder))
    with started_nginx(NGINX, main, folder, f"http://{listen}", wait=15) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(database_url, services, tmp_path_factory) -> Iterator[Cluster]:
    """Three instances behind deploy/nginx.conf, for the whole module."""
    redis.Redis.from_url(services.redis_url).flushdb()
    settings = Settings(
        database_url=database_url, redis_url=services.redis_url, secret_key=TEST_SECRET
    )
    folder = tmp_path_factory.mktemp("deploy")
    instances = [
        Instance(name, free_port(), server_env(settings, **FAST), folder / f"{name}.log")
        for name in ("a", "b", "c")
    ]
    try:
        for instance in instances:
            instance.start()
        with running_nginx(folder, [i.url for i in instances]) as url:
            yield Cluster(
                url,
                instances,
                database_url,
                folder,
                lambda: (folder / "error.log").read_text(errors="replace"),
            )
    finally:
        for instance in instances:
            with contextlib.suppress(AssertionError):
                instance.stop()


@pytest.fixture
async def http(cluster: Cluster):
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        yield client


def booking_body(event_id: str, **what: object) -> dict[str, object]:
    return {"event_id": event_id, "payment": {"method": "card", "token": "tok_visa"}, **what}


async def seat_statuses(http: httpx.AsyncClient, event_id: str) -> dict[str, str]:
    response = await http.get(f"/events/{event_id}/seats")
    assert response.status_code == 200, response.text
    return {s["id"]: s["status"] for s in response.json()["seats"]}


# --- nginx.conf: the booking flow, gzip, revalidation, per-client limits ---------------------


@needs_nginx
async def test_hold_then_book_through_nginx(cluster, http):
    event_id, seats, _, _ = await published_event(http)
    auth = await buyer(http)
    hold = await http.post(
        "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
    )
    assert hold.status_code == 201, hold.text
    key = uuid.uuid4().hex
    headers = {**auth, "Idempotency-Key": key, "Prefer": "wait=10"}
    body = booking_body(event_id, hold_id=hold.json()["id"])
    response = await http.post("/bookings", headers=headers, json=body)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "confirmed"
    booking = response.json()["booking"]
    assert sorted(i["seat_id"] for i in booking["items"]) == sorted(seats[:2])

    found = await http.get(f"/bookings/{booking['id']}", headers=auth)
    assert found.status_code == 200
    assert found.json()["status"] == "confirmed"
    assert found.json()["payment"]["status"] == "succeeded"
    assert len(found.json()["tickets"]) == 2
    statuses = await seat_statuses(http, event_id)
    assert [statuses[s] for s in seats[:3]] == ["sold", "sold", "available"]

    # The same key again, wherever nginx sends it: the same booking.
    again = await http.post("/bookings", headers=headers, json=body)
    assert again.status_code == 201, again.text
    assert again.json()["booking"]["id"] == booking["id"]


@needs_nginx
async def test_json_is_compressed_and_revalidated_through_nginx(cluster, http):
    event_id, _, _, _ = await published_event(http)
    first = await http.get(f"/events/{event_id}/seats", headers={"Accept-Encoding": "gzip"})
    assert first.status_code == 200
    assert first.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in first.headers["vary"]
    etag = first.headers["etag"]  # weakened by nginx's gzip; Bilten compares weakly
    again = await http.get(f"/events/{event_id}/seats", headers={"If-None-Match": etag})
    assert again.status_code == 304
    # Each instance's metrics are scraped from the instance, never through the balancer.
    assert (await http.get("/metrics")).status_code == 404
    assert httpx.get(cluster.instances[0].url + "/metrics").status_code == 200


@needs_nginx
def test_failed_logins_are_counted_per_client_behind_nginx(cluster):
    """X-Forwarded-For as deploy/nginx.conf sets it names the client: one address's failed
    logins (5 a minute per email and address) do not lock out another's."""
    email = f"nobody-{uuid.uuid4().hex[:8]}@example.com"
    wrong = {"email": email, "password": "not the password"}
    with client_from("127.0.0.2", cluster.url) as one, client_from("127.0.0.3", cluster.url) as two:
        statuses = [one.post("/auth/login", json=wrong).status_code for _ in range(6)]
        assert statuses == [401] * 5 + [429]
        assert two.post("/auth/login", json=wrong).status_code == 401


# --- realtime through nginx ------------------------------------------------------------------


def ws_url(cluster: Cluster) -> str:
    return cluster.url.replace("http://", "ws://") + "/ws"


@needs_nginx
async def test_a_hold_reaches_a_websocket_through_nginx(cluster, http):
    event_id, seats, _, _ = await published_event(http)
    async with connect(ws_url(cluster), proxy=None, compression=None, open_timeout=10) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["type"] == "hello"
        assert hello["instance"] in {i.instance_id for i in cluster.instances}
        await ws.send(json.dumps({"type": "subscribe", "room": f"event:{event_id}"}))
        snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert snapshot["type"] == "seats.snapshot"
        assert {s["status"] for s in snapshot["seats"]} == {"available"}
        subscribed = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert subscribed["type"] == "subscribed"

        auth = await buyer(http)
        hold = await http.post(
            "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
        )
        assert hold.status_code == 201, hold.text
        async with asyncio.timeout(10):
            while (message := json.loads(await ws.recv()))["type"] != "seats":
                pass
        assert message["version"] > snapshot["version"]
        assert {c["seat_id"]: c["status"] for c in message["changes"]} == {
            seats[0]: "held",
            seats[1]: "held",
        }


class LiveSeatMap:
    """A small reconnecting client of one event's seat map, as a browser would keep it.

    It connects through nginx, subscribes, and applies each change whose version is newer than
    its seat's. When the connection drops it connects again (once ``may_connect`` is set) and
    subscribes with the last version it saw: it gets the missed deltas, or a fresh snapshot
    when the instance it lands on cannot reach back that far.
    """

    def __init__(self, url: str, event_id: str) -> None:
        self.url = url
        self.event_id = event_id
        self.statuses: dict[str, str] = {}
        self.versions: dict[str, int] = {}
        self.version: int | None = None
        self.instances: list[str] = []  # the instance of each connection, from its hello
        self.subscribed = asyncio.Event()
        self.may_connect = asyncio.Event()
        self.may_connect.set()
        self.drops: list[str] = []
        self.changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            await self.may_connect.wait()
            try:
                async with connect(
                    self.url, proxy=None, compression=None, open_timeout=5, close_timeout=2
                ) as ws:
                    hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    self.instances.append(hello["instance"])
                    request: dict[str, object] = {
                        "type": "subscribe",
                        "room": f"event:{self.event_id}",
                    }
                    if self.version is not None:
                        request["version"] = self.version
                    await ws.send(json.dumps(request))
                    async for raw in ws:
                        self.apply(json.loads(raw))
                    self.drops.append(f"closed {ws.close_code}")
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                self.drops.append(repr(exc))
            self.subscribed.clear()
            await asyncio.sleep(0.2)

    def apply(self, message: dict) -> None:
        kind = message["type"]
        if kind == "seats.snapshot":
            self.statuses = {s["id"]: s["status"] for s in message["seats"]}
            self.versions = {s["id"]: s["version"] for s in message["seats"]}
            self.version = max(self.version or 0, message["version"])
        elif kind == "seats":
            for change in message["changes"]:
                if change["version"] > self.versions.get(change["seat_id"], -1):
                    self.statuses[change["seat_id"]] = change["status"]
                    self.versions[change["seat_id"]] = change["version"]
            self.version = max(self.version or 0, message["version"])
        elif kind == "subscribed":
            self.version = max(self.version or 0, message["version"])
            self.subscribed.set()
        elif kind == "error":
            raise AssertionError(message)
        self.changed.set()

    async def until(self, expected: dict[str, str], timeout: float = 15) -> None:
        """Wait until the client's seat map equals ``expected``."""
        try:
            async with asyncio.timeout(timeout):
                while self.statuses != expected or not self.subscribed.is_set():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            differ = {
                k: (self.statuses.get(k), v)
                for k, v in expected.items()
                if self.statuses.get(k) != v
            }
            raise AssertionError(f"the live map differs: {differ}; drops {self.drops}") from None


@needs_nginx
async def test_a_websocket_survives_the_restart_of_its_instance(cluster, http):
    event_id, seats, _, _ = await published_event(http)
    auth = await buyer(http)
    live = LiveSeatMap(ws_url(cluster), event_id)
    task = asyncio.create_task(live.run())
    try:
        await live.until(await seat_statuses(http, event_id))
        first = live.instances[0]
        home = cluster.by_id(first)  # the instance the socket landed on

        # Stop it (SIGTERM: a clean drain) and change the map while the client is away.
        live.may_connect.clear()
        assert await asyncio.to_thread(home.stop) == 0, home.log
        async with asyncio.timeout(10):
            while live.subscribed.is_set():
                await asyncio.sleep(0.05)
        hold = await http.post(
            "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
        )
        assert hold.status_code == 201, hold.text
        booked = await http.post(
            "/bookings",
            headers={**auth, "Idempotency-Key": uuid.uuid4().hex, "Prefer": "wait=10"},
            json=booking_body(event_id, seat_ids=seats[2:4]),
        )
        assert booked.status_code == 201, booked.text
        released = await http.post(
            "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[4:5]}
        )
        assert released.status_code == 201, released.text
        deleted = await http.delete(f"/holds/{released.json()['id']}", headers=auth)
        assert deleted.status_code == 204

        # It reconnects through nginx (its instance still down: another one takes it) and
        # resubscribes with its last version: the map matches the server's.
        live.may_connect.set()
        expected = await seat_statuses(http, event_id)
        assert [expected[s] for s in seats[:5]] == ["held", "held", "sold", "sold", "available"]
        await live.until(expected)
        assert len(live.instances) == 2 and live.instances[1] != first

        # The instance comes back on the same port, a new process; nginx uses it again, and
        # the client goes on following changes made through any instance.
        await asyncio.to_thread(home.start)
        assert home.instance_id != first
        for seat in seats[5:8]:
            hold = await http.post(
                "/holds", headers=auth, json={"event_id": event_id, "seat_ids": [seat]}
            )
            assert hold.status_code == 201, hold.text
        expected = await seat_statuses(http, event_id)
        assert [expected[s] for s in seats[5:8]] == ["held"] * 3
        await live.until(expected)

        # Now stop whichever instance the socket is on, without warning the client: it comes
        # back by itself and catches up with what happened in the meantime.
        second = cluster.by_id(live.instances[-1])
        stopping = asyncio.create_task(asyncio.to_thread(second.stop))
        hold = await http.post(
            "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[8:10]}
        )
        assert hold.status_code == 201, hold.text
        assert await stopping == 0, second.log
        expected = await seat_statuses(http, event_id)
        await live.until(expected)
        assert len(live.instances) >= 3
        await asyncio.to_thread(second.start)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- a rolling restart under load --------------------------------------------------------------


@dataclass
class Tally:
    retried: collections.Counter[str] = field(default_factory=collections.Counter)
    answered_202: int = 0


async def book_until_known(
    http: httpx.AsyncClient, auth: dict[str, str], event_id: str, seat_ids: list[str], tally: Tally
) -> str:
    """Book ``seat_ids`` as a careful client does: one Idempotency-Key, sent again on a 502, 503
    or lost connection; a 202 is followed until its outcome. The booking's id."""
    key = uuid.uuid4().hex
    headers = {**auth, "Idempotency-Key": key, "Prefer": "wait=10"}
    body = booking_body(event_id, seat_ids=seat_ids)
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, f"no answer for {key}: {dict(tally.retried)}"
        try:
            response = await http.post("/bookings", headers=headers, json=body)
        except httpx.TransportError as exc:
            tally.retried[f"POST {type(exc).__name__}"] += 1
        else:
            if response.status_code not in RETRY:
                break
            tally.retried[f"POST {response.status_code}"] += 1
        await asyncio.sleep(0.2)
    if response.status_code == 201:
        assert response.json()["status"] == "confirmed", response.text
        return str(response.json()["booking"]["id"])
    assert response.status_code == 202, response.text
    tally.answered_202 += 1
    request_id = response.json()["request_id"]
    while True:
        assert time.monotonic() < deadline, f"request {request_id} never finished"
        try:
            found = await http.get(f"/bookings/requests/{request_id}", headers=auth)
        except httpx.TransportError as exc:
            tally.retried[f"GET {type(exc).__name__}"] += 1
        else:
            if found.status_code in RETRY:
                tally.retried[f"GET {found.status_code}"] += 1
            else:
                assert found.status_code == 200, found.text
                state = found.json()
                if state["status"] in ("confirmed", "failed"):
                    assert state["status"] == "confirmed", state
                    return str(state["booking_id"])
        await asyncio.sleep(0.2)


def fail_timeout() -> float:
    """How long nginx leaves out an instance that failed (deploy/nginx.conf)."""
    found = re.search(r"fail_timeout=(\d+)s", (DEPLOY / "nginx.conf").read_text())
    assert found
    return float(found.group(1))


@needs_nginx
@pytest.mark.timeout(240)
async def test_a_rolling_restart_under_load_loses_and_fails_nothing(cluster, http):
    """Each instance in turn: SIGTERM, wait for it to exit, start it again on its port, wait
    until it is ready and nginx uses it again (deploy/README.md's procedure). Meanwhile 20
    buyers book through nginx, each booking with its own Idempotency-Key."""
    buyers, per_buyer = 20, 100
    event_id, seats, _, _ = await published_event(
        http, rows=buyers, per_row=per_buyer, max_per_order=per_buyer
    )
    auths = [await buyer(http) for _ in range(buyers)]
    tally = Tally()
    booked: list[tuple[str, list[str]]] = []
    stop = asyncio.Event()

    async def shop(n: int) -> None:
        mine = seats[n * per_buyer : (n + 1) * per_buyer]
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
            at = 0
            while at < len(mine) and not stop.is_set():
                pick = mine[at : at + 1 + n % 2]  # one or two seats a booking
                at += len(pick)
                booking_id = await book_until_known(client, auths[n], event_id, pick, tally)
                booked.append((booking_id, pick))
                await asyncio.sleep(0.5)

    shoppers = [asyncio.create_task(shop(n)) for n in range(buyers)]
    try:
        await asyncio.sleep(1)  # the sale is under way
        restarted = []
        for instance in cluster.instances:
            before = len(booked)
            assert await asyncio.to_thread(instance.stop) == 0, instance.log
            await asyncio.to_thread(instance.start)
            await asyncio.sleep(fail_timeout())
            restarted.append((instance.name, len(booked) - before))
        stop.set()
        await asyncio.gather(*shoppers)
    finally:
        stop.set()
        for shopper in shoppers:
            shopper.cancel()
        await asyncio.gather(*shoppers, return_exceptions=True)

    print(
        f"bookings {len(booked)}, by restart {restarted}, 202s {tally.answered_202}, "
        f"retried {dict(tally.retried)}"
    )
    assert all(n > 0 for _, n in restarted), restarted  # bookings went on through each restart
    # Nothing had to be sent again: a stopping instance refuses new connections (nginx tries
    # the next), answers what reaches it, and is left out while it restarts.
    assert not tally.retried, (dict(tally.retried), cluster.nginx_log()[-3000:])
    ids = [booking_id for booking_id, _ in booked]
    assert len(set(ids)) == len(ids)
    wanted = {booking_id: sorted(pick) for booking_id, pick in booked}

    conn = await db.connect(cluster.database_url)
    try:
        rows = await conn.fetch(
            """SELECT b.id::text AS id, b.saga_state,
                      array_agg(i.seat_id::text ORDER BY i.seat_id) AS seat_ids
               FROM bookings b JOIN booking_items i ON i.booking_id = b.id
               WHERE b.event_id = $1 GROUP BY b.id""",
            event_id,
        )
        # Every booking the buyers asked for exists once, confirmed, with its seats; no other.
        assert {r["id"]: r["saga_state"] for r in rows} == dict.fromkeys(wanted, "CONFIRMED")
        assert {r["id"]: sorted(r["seat_ids"]) for r in rows} == wanted
        sold = await conn.fetch(
            "SELECT seat_id::text, booking_id::text FROM event_seats"
            " WHERE event_id = $1 AND status = 'sold'",
            event_id,
        )
        items = sum(len(pick) for pick in wanted.values())
        assert len(sold) == items
        assert {r["seat_id"]: r["booking_id"] for r in sold} == {
            seat: booking_id for booking_id, pick in wanted.items() for seat in pick
        }
        tickets = await conn.fetchval(
            "SELECT count(*) FROM tickets WHERE event_id = $1 AND status = 'valid'", event_id
        )
        assert tickets == items
        accepted = await conn.fetchval(
            "SELECT count(*) FROM bookings WHERE event_id = $1 AND saga_state <> 'CONFIRMED'",
            event_id,
        )
        assert accepted == 0
    finally:
        await conn.close()


async def exchange(
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
) -> tuple[int, dict[str, str]]:
    """Send one raw HTTP/1.1 request on an open connection; the status and headers."""
    reader, writer = stream
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines if line)
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers


REFRESH = (
    b"POST /auth/refresh HTTP/1.1\r\nHost: bilten\r\nContent-Type: application/json\r\n"
    b'Content-Length: 22\r\n\r\n{"refresh_token": "x"}'
)
HEALTH = b"GET /health HTTP/1.1\r\nHost: bilten\r\n\r\n"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: bilten\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("trusted", [True, False], ids=["from-a-proxy", "from-a-client"])
async def test_a_stop_answers_what_comes_on_a_balancers_idle_connections(
    database_url, services, trusted
):
    """A balancer may send a request on a pooled connection at the instant a drain begins:
    that request is answered (``Connection: close``) rather than cut, and a WebSocket upgrade
    is closed unanswered (the balancer retries it elsewhere). Idle connections of other
    clients are closed at once, as before."""
    from bilten.cli import make_server

    settings = Settings(
        database_url=database_url,
        redis_url=services.redis_url,
        secret_key=TEST_SECRET,
        roles=frozenset({"api"}),
        trusted_proxies=("127.0.0.1/32",) if trusted else (),
        log_format="text",
    )
    port = free_port()
    server = make_server(settings, "127.0.0.1", port)
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(20):
        while not server.started:
            await asyncio.sleep(0.02)
    pooled = await asyncio.open_connection("127.0.0.1", port)
    assert (await exchange(pooled, HEALTH))[0] == 200  # used once, then idle in the pool
    fresh = await asyncio.open_connection("127.0.0.1", port)  # opened, nothing sent yet
    upgrade = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.1)

    began = time.monotonic()
    server.should_exit = True  # what SIGTERM does
    async with asyncio.timeout(10):  # the drain has begun once the port refuses
        while True:
            try:
                _, probe = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                break
            probe.close()
            await asyncio.sleep(0.01)

    if trusted:
        status, headers = await exchange(pooled, REFRESH)
        assert status == 401 and headers["connection"] == "close"
        status, headers = await exchange(fresh, HEALTH)
        assert status == 200 and headers["connection"] == "close"
        for reader, _ in (pooled, fresh):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        upgrade[1].write(UPGRADE)
        assert await asyncio.wait_for(upgrade[0].read(), 5) == b""
    else:
        for reader, _ in (pooled, fresh, upgrade):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
    await asyncio.wait_for(serving, 20)
    assert time.monotonic() - began < 10
    for _, writer in (pooled, fresh, upgrade):
        writer.close()


# --- compose.yaml, the env example, the systemd unit ----------------------------------------


def env_example() -> dict[str, str]:
    found = {}
    for line in (DEPLOY / "bilten.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip()
    return found


def filled(env: dict[str, str]) -> dict[str, str]:
    """The example as an operator fills it in: every empty value but SMTP given one."""
    values = {
        "BILTEN_SECRET_KEY": "s" * 48,
        "BILTEN_DATA_KEY": "d" * 48,
        "BILTEN_STRIPE_API_KEY": "sk_test_123",
        "BILTEN_STRIPE_WEBHOOK_SECRET": "whsec_123",
        "POSTGRES_PASSWORD": "change-me",
    }
    return {k: v or values.get(k, "") for k, v in env.items()}


def test_the_env_example_is_a_valid_configuration_once_filled_in():
    from bilten.settings import from_env

    env = env_example()
    for name in (
        "BILTEN_SECRET_KEY",
        "BILTEN_DATA_KEY",
        "BILTEN_PAYMENT_PROVIDER",
        "BILTEN_PUBLIC_URL",
        "BILTEN_TRUSTED_PROXIES",
        "BILTEN_DATABASE_URL",
        "BILTEN_REDIS_URL",
    ):
        assert name in env, name
    # No secret ships with a value everyone would know.
    assert env["BILTEN_SECRET_KEY"] == env["BILTEN_DATA_KEY"] == env["POSTGRES_PASSWORD"] == ""
    settings = from_env(filled(env))
    assert settings.payment_provider == "stripe" and settings.payment_provider_chosen
    assert settings.trusted_proxies == ("127.0.0.1/32",)
    assert settings.public_url.startswith("https://")
    assert settings.shutdown_timeout == 10


def unit_file() -> dict[str, list[str]]:
    """bilten@.service's [Service] settings (a name may repeat)."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    section = ""
    for line in (DEPLOY / "bilten@.service").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[Service]":
            name, _, value = line.partition("=")
            found[name].append(value)
    return found


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)\s*(s|min)?", value).groups()
    return float(number) * (60 if unit == "min" else 1)


def test_the_systemd_unit_runs_one_instance_per_port_and_drains():
    unit = unit_file()
    (command,) = unit["ExecStart"]
    assert command.endswith("/bilten serve --host 127.0.0.1 --port %i")
    assert unit["User"][0] not in ("", "root")
    assert unit["EnvironmentFile"] == ["/etc/bilten/bilten.env"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    # A drain takes the shutdown timeout for requests, then again for the workers.
    shutdown = float(env_example()["BILTEN_SHUTDOWN_TIMEOUT"])
    assert seconds(unit["TimeoutStopSec"][0]) > 2 * shutdown
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """As an instance of the template, its ExecStart pointed at this checkout's bilten."""
    text = (DEPLOY / "bilten@.service").read_text()
    bilten = Path(sys.executable).with_name("bilten")
    assert bilten.exists()
    text = text.replace("/opt/bilten/bin/bilten", str(bilten))
    unit = tmp_path / "bilten@8001.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""  # an unknown or malformed setting is only a warning


def compose_file() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_runs_migrate_then_the_instances_behind_nginx():
    services = compose_file()["services"]
    command = {name: " ".join(s.get("command") or []) for name, s in services.items()}
    api = sorted(
        n
        for n, c in command.items()
        if c.endswith("serve --host 0.0.0.0 --port 8000 --roles api,realtime")
    )
    workers = [n for n, c in command.items() if c.endswith("--roles workers")]
    assert len(api) >= 2 and len(workers) == 1
    assert command["migrate"] == "bilten migrate"
    assert services["migrate"]["restart"] == "no"
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    for name in (*api, *workers):
        service = services[name]
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert service["env_file"] == ".env"
        assert seconds(service["stop_grace_period"]) > 2 * float(
            env_example()["BILTEN_SHUTDOWN_TIMEOUT"]
        )
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"

    # nginx mounts deploy/nginx.conf, whose upstream lists exactly the API instances; they
    # trust nginx's fixed address.
    nginx = services["nginx"]
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    upstream = re.findall(
        r"^\s*server\s+([\w.-]+):(\d+)\s", (DEPLOY / "nginx.conf").read_text(), re.M
    )
    assert sorted(upstream) == [(name, "8000") for name in api]
    address = nginx["networks"]["backend"]["ipv4_address"]
    for name in api:
        assert services[name]["environment"]["BILTEN_TRUSTED_PROXIES"] == address


def test_the_image_installs_the_project_and_runs_unprivileged():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)
    assert re.search(r"^USER bilten$", dockerfile, re.M)
    assert re.search(r'^CMD \["bilten", "serve"\]$', dockerfile, re.M)


def compose_command() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run([*command, "version"], capture_output=True, timeout=30)
            if done.returncode == 0:
                return command
    return None


def test_compose_config_accepts_the_file(tmp_path):
    """``docker compose config`` (or docker-compose's) validates the file without a daemon."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    folder = tmp_path / "deploy"
    shutil.copytree(DEPLOY, folder, ignore=shutil.ignore_patterns(".env"))
    (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in filled(env_example()).items()))
    done = subprocess.run(
        [*command, "config", "--quiet"], cwd=folder, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
