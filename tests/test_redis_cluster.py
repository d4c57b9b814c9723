"""Bilten on a real Redis Cluster and behind a real Sentinel, started here.

The cluster (three primaries): the booking flow (hold, book through the queue, confirmation,
status polling, an Idempotency-Key replayed) and the realtime flow (a hold on one instance
reaches a WebSocket on another) run on two ``bilten serve`` processes; with a replica each, the
primary of an event's slot is killed and its replica takes over. Sentinel: a booking, then the
primary killed (``kill -9``), and started again empty on its port or replaced by its replica.
Each time Bilten pauses, and finishes what it had accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis

from bilten import keys, queue, redisconn, redisurl
from bilten.settings import Settings
from tests.conftest import ROOT, TEST_SECRET, Server, server_env, serving
from tests.test_bookings import book, buyer, published_event
from tests.test_catalog import running
from tests.test_realtime import (
    FAST,
    receive_until,
    seat_statuses,
    socket_to,
    subscribe,
    token_of,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("redis-server") and shutil.which("redis-cli")),
        reason="redis-server and redis-cli are needed to start a Redis Cluster and a Sentinel "
        "(Debian: apt-get install redis-server)",
    ),
]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(count: int, start: int, bus: bool = False) -> list[int]:
    """``count`` free ports from ``start`` on (with ``bus``, their cluster bus ports too)."""
    found: list[int] = []
    port = start
    while len(found) < count:
        if _free(port) and (not bus or _free(port + 10000)):
            found.append(port)
        port += 1
    return found


def redis_server(folder: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    """A private redis-server on ``port``: no snapshots, no append-only file."""
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    with open(folder / f"redis-{port}.log", "ab") as log:
        return subprocess.Popen(
            [*command, "--save", "", "--appendonly", "no", *options],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def cli(port: int, *args: str) -> str:
    found = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10
    )
    return found.stdout


def wait_for(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def redis_cluster(
    folder: Path, primaries: int = 3, replicas: int = 0
) -> Iterator[tuple[list[int], list[subprocess.Popen[bytes]]]]:
    """A Redis Cluster on free ports: ``primaries`` primaries with ``replicas`` replicas each,
    slots spread by ``redis-cli --cluster create``. Yields the ports and the processes."""
    ports = free_ports(primaries * (1 + replicas), 17000, bus=True)
    nodes = [
        redis_server(
            folder,
            port,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            "1000",
            # A replica may take over however long ago it last heard its primary.
            "--cluster-replica-validity-factor",
            "0",
        )
        for port in ports
    ]
    try:
        for port in ports:
            wait_for(lambda port=port: cli(port, "ping").strip() == "PONG", f"node {port}")
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        for port in ports:
            wait_for(
                lambda port=port: "cluster_state:ok" in cli(port, "cluster", "info"),
                f"cluster state on {port}",
            )
            if "role:slave" in cli(port, "info", "replication"):
                wait_for(
                    lambda port=port: "master_link_status:up" in cli(port, "info", "replication"),
                    f"the replica on {port} in sync",
                )
        yield ports, nodes
    finally:
        stop(nodes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[list[int]]:
    """Three primaries, no replicas."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as (ports, _):
        yield ports


@pytest.fixture(scope="module")
def cluster_url(cluster) -> str:
    return f"redis+cluster://127.0.0.1:{cluster[0]},127.0.0.1:{cluster[1]}"


@pytest.fixture
async def cluster_redis(cluster_url) -> Iterator[aioredis.Redis]:
    client = redisconn.client(cluster_url)
    await client.flushdb()  # on every primary
    yield client
    await client.aclose()


@pytest.fixture
def cluster_servers(database_url, cluster_url, cluster_redis, tmp_path) -> Iterator[list[Server]]:
    """Two ``bilten serve`` processes on the cluster."""
    settings = Settings(database_url=database_url, redis_url=cluster_url, secret_key=TEST_SECRET)
    env = server_env(settings, **FAST)
    ports = [free_ports(1, 18000 + 100 * n)[0] for n in range(2)]
    with serving(tmp_path, [("a", ports[0], env), ("b", ports[1], env)]) as started:
        yield started


def test_the_urls_of_a_cluster_and_a_sentinel_are_read_and_bad_ones_refused():
    target = redisurl.parse("redis+cluster://10.0.0.1:7000,10.0.0.2")
    assert target.kind == "cluster"
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
    target = redisurl.parse("rediss+sentinel://u:p%40ss@s1:26380,s2/mymaster/2")
    assert (target.kind, target.service, target.db, target.tls) == ("sentinel", "mymaster", 2, True)
    assert (target.username, target.password) == ("u", "p@ss")
    assert target.nodes == (("s1", 26380), ("s2", 26379))
    assert redisurl.where("redis+sentinel://:secret@s1:1/mymaster") == "s1:1/mymaster"
    for bad in (
        "redis+cluster://h:port",
        "redis+cluster://h:7000/3",
        "redis+cluster://",
        "redis+sentinel://h:26379",
        "redis+sentinel://h/mymaster/x",
        "redis+cluster://h1,,h2",
    ):
        with pytest.raises(ValueError):
            redisurl.parse(bad)


def test_a_bad_redis_url_stops_serve_with_one_clear_line(tmp_path):
    env = server_env(
        Settings(database_url="postgresql://x@127.0.0.1/x", redis_url="", secret_key="x" * 64),
        BILTEN_REDIS_URL="redis+sentinel://127.0.0.1:26379",
    )
    found = subprocess.run(
        [sys.executable, "-m", "bilten", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert found.returncode != 0
    assert "BILTEN_REDIS_URL: redis+sentinel://host:port" in found.stderr + found.stdout


async def test_an_events_keys_and_its_requests_share_one_slot(cluster_redis):
    event_id = "6f1c1f7e-6d0e-4a8e-9a59-0d7a4a2b9c11"
    request_id = queue.new_request_id(event_id)
    names = [
        keys.queue(event_id),
        keys.queue_ticket(event_id),
        keys.queue_served(event_id),
        keys.queue_lease(event_id),
        keys.seat_claims(event_id),
        keys.idempotency(event_id, "user", "key"),
        keys.booking_request(request_id),
    ]
    slots = {await cluster_redis.cluster_keyslot(name) for name in names}
    assert len(slots) == 1
    assert (
        len({await cluster_redis.cluster_keyslot(k) for k in (keys.INSTANCES, keys.instance("i"))})
        == 1
    )


async def test_booking_and_realtime_on_a_three_node_cluster(cluster_servers, cluster_redis):
    a, b = cluster_servers
    async with httpx.AsyncClient(base_url=a.url, timeout=15) as http:
        event_id, seats, _, _ = await published_event(http)
        auth = await buyer(http)
        # Realtime: a watcher on B sees a hold made on A.
        async with socket_to(b) as watcher:
            await subscribe(watcher, event_id)
            hold = await http.post(
                "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
            )
            assert hold.status_code == 201, hold.text
            delta = await receive_until(watcher, "seats", timeout=3.0)
            assert seat_statuses(delta) == {seats[0]: "held", seats[1]: "held"}

            # The hold booked through the queue, and confirmed.
            body = {"event_id": event_id, "hold_id": hold.json()["id"]}
            booked = await book(http, auth, body, key="cluster-1")
            assert booked.status_code == 201, booked.text
            booking = booked.json()["booking"]
            assert booking["status"] == "confirmed" and len(booking["tickets"]) == 2
            delta = await receive_until(watcher, "seats", timeout=3.0)
            assert set(seat_statuses(delta).values()) == {"sold"}

        # The same key and body again: the same booking.
        again = await book(http, auth, body, key="cluster-1")
        assert again.status_code == 201, again.text
        assert again.json()["booking"]["id"] == booking["id"]
        other = await book(http, auth, {"event_id": event_id, "seat_ids": seats[5:6]}, "cluster-1")
        assert other.status_code == 422
        assert other.json()["error"]["code"] == "idempotency_mismatch"

        # Queued without waiting, then polled (on the other instance) until confirmed; its
        # owner's socket on B hears its place (published by the door's script) and its
        # outcome, a watcher of the event the served counter move.
        async with (
            httpx.AsyncClient(base_url=b.url, timeout=15) as other_http,
            socket_to(b, token_of(auth)) as mine,
            socket_to(b) as watcher,
        ):
            await subscribe(watcher, event_id)
            body = {"event_id": event_id, "seat_ids": seats[2:3]}
            queued = await book(http, auth, body, headers={})
            assert queued.status_code == 202, queued.text
            request_id = queued.json()["request_id"]
            assert request_id[: keys.TAG_LENGTH] == keys.event_tag(event_id)
            position = await receive_until(mine, "queue.position", timeout=3.0)
            assert position["request_id"] == request_id and position["position"] >= 1
            deadline = time.monotonic() + 10
            while True:
                status = await other_http.get(f"/bookings/requests/{request_id}", headers=auth)
                assert status.status_code == 200, status.text
                if status.json()["status"] == "confirmed":
                    break
                assert time.monotonic() < deadline, status.json()
                await asyncio.sleep(0.05)
            await receive_until(mine, "booking.result", timeout=3.0, request_id=request_id)
            served = await receive_until(watcher, "queue.served", timeout=3.0)
            assert served["event_id"] == event_id and served["served"] >= 1
            replay = await book(other_http, auth, body, headers={})
        # A replay without its key is a new request for a sold seat: refused at the door.
        assert replay.status_code == 409
        # The event's keys are where the tags put them: one node holds them all.
        slot = await cluster_redis.cluster_keyslot(keys.queue(event_id))
        assert await cluster_redis.cluster_keyslot(keys.booking_request(request_id)) == slot
        assert await cluster_redis.exists(keys.booking_request(request_id))
    for server in cluster_servers:
        assert "Traceback" not in server.log, server.log


async def request_status(c: httpx.AsyncClient, who: Any, request_id: str) -> httpx.Response:
    """``GET /bookings/requests/{id}``, asked again while it answers 503: a pooled connection
    the failover closed fails the one read that meets it (for at most 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        status = await c.get(f"/bookings/requests/{request_id}", headers=who)
        if status.status_code != 503 or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


async def accepted_again(
    c: httpx.AsyncClient, auth: Any, event_id: str, seat: str, since: float
) -> httpx.Response:
    """A booking of ``seat`` asked for until Redis answers again (503 meanwhile, for at most
    20 s after ``since``); it must then be accepted (202)."""
    while True:
        after = await book(c, auth, {"event_id": event_id, "seat_ids": [seat]}, headers={})
        if after.status_code != 503:
            break
        assert time.monotonic() - since < 20, after.text
        await asyncio.sleep(0.05)
    assert after.status_code == 202, after.text
    return after


async def one_booked_ten_queued(
    c: httpx.AsyncClient,
) -> tuple[str, list[str], Any, list[Any], list[str]]:
    """A published event, one booking confirmed through the Redis in use, then ten more asked
    for at once by ten other buyers and accepted (202): the event, its seats, the first buyer,
    the ten others and their request ids."""
    event_id, seats, _, _ = await published_event(c)
    auth = await buyer(c)
    first = await book(c, auth, {"event_id": event_id, "seat_ids": seats[:1]})
    assert first.status_code == 201, first.text
    buyers = [await buyer(c) for _ in range(10)]
    answers = await asyncio.gather(
        *(
            book(c, who, {"event_id": event_id, "seat_ids": [seats[n + 1]]}, headers={})
            for n, who in enumerate(buyers)
        )
    )
    assert [a.status_code for a in answers] == [202] * 10
    return event_id, seats, auth, buyers, [a.json()["request_id"] for a in answers]


async def test_on_a_cluster_a_primarys_failover_pauses_its_events_and_loses_nothing(
    settings, tmp_path, caplog
):
    """Three primaries with a replica each; the primary of an event's slot killed: its
    replica takes over, the event's bookings pause, then go on, and what was accepted ends
    confirmed, once."""
    with redis_cluster(tmp_path, replicas=1) as (ports, nodes):
        url = f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
        async with running(settings.replace(redis_url=url)) as (instance, c):
            event_id, seats, auth, buyers, accepted = await one_booked_ten_queued(c)
            owner = cast(Any, instance.state.redis).get_node_from_key(keys.queue(event_id))
            nodes[ports.index(owner.port)].kill()
            killed = time.monotonic()
            after = await accepted_again(c, auth, event_id, seats[20], killed)
            back = time.monotonic() - killed
            accepted.append(after.json()["request_id"])
            states = await final_states(instance.state.db, accepted)
            finished = time.monotonic() - killed
            assert states == dict.fromkeys(accepted, "CONFIRMED")
            for who, request_id in zip([*buyers, auth], accepted, strict=True):
                status = await request_status(c, who, request_id)
                assert status.json()["status"] == "confirmed", status.text
            again = [m.getMessage() for m in caplog.records if "had lost them" in m.getMessage()]
            print(
                f"the event's primary killed; bookings accepted again {back:.2f} s after, "
                f"all accepted confirmed {finished:.2f} s after; recovery: "
                f"{again or 'nothing lost'}"
            )


# --- Sentinel ---------------------------------------------------------------------------------


@contextlib.contextmanager
def watched(folder: Path, replica: bool) -> Iterator[tuple[list[int], list[subprocess.Popen]]]:
    """A primary (and, with ``replica``, its replica) and one Sentinel watching it as
    ``mymaster``: the ports (primary, Sentinel, replica) and processes, in that order."""
    ports = free_ports(3 if replica else 2, 26390)
    primary_port, sentinel_port = ports[:2]
    config = folder / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {folder}\n"
        f"sentinel monitor mymaster 127.0.0.1 {primary_port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 10000\n"
    )
    processes = [redis_server(folder, primary_port)]
    try:
        wait_for(lambda: cli(primary_port, "ping").strip() == "PONG", "the primary")
        with open(folder / "sentinel.log", "ab") as log:
            processes.append(
                subprocess.Popen(
                    ["redis-server", str(config), "--sentinel"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        if replica:
            processes.append(
                redis_server(folder, ports[2], "--replicaof", "127.0.0.1", str(primary_port))
            )
            wait_for(
                lambda: "master_link_status:up" in cli(ports[2], "info", "replication"),
                "the replica",
            )
            wait_for(
                lambda: str(ports[2]) in cli(sentinel_port, "sentinel", "replicas", "mymaster"),
                "the sentinel's knowledge of the replica",
            )
        wait_for(
            lambda: (
                str(primary_port)
                in cli(sentinel_port, "sentinel", "get-master-addr-by-name", "mymaster")
            ),
            "the sentinel",
        )
        yield ports, processes
    finally:
        stop(processes)


async def final_states(db, ids: list[str], timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await db.fetch(
            "SELECT id::text, saga_state FROM bookings WHERE id = ANY ($1::uuid[])", ids
        )
        states = {r["id"]: r["saga_state"] for r in rows}
        done = all(s in ("CONFIRMED", "FAILED", "CANCELLED") for s in states.values())
        if (len(states) == len(ids) and done) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.1)


async def test_through_sentinel_a_restart_of_the_primary_pauses_bookings_and_loses_none(
    settings, tmp_path, caplog
):
    with watched(tmp_path, replica=False) as (ports, processes):
        await restart_or_failover(settings, tmp_path, caplog, ports, processes)


async def test_through_sentinel_a_failover_to_the_replica_pauses_bookings_and_loses_none(
    settings, tmp_path, caplog
):
    with watched(tmp_path, replica=True) as (ports, processes):
        await restart_or_failover(settings, tmp_path, caplog, ports, processes)
        # The replica is the primary now.
        found = cli(ports[1], "sentinel", "get-master-addr-by-name", "mymaster")
        assert str(ports[2]) in found, found


async def restart_or_failover(settings, folder, caplog, ports, processes) -> None:
    """A booking through the Sentinel; ten more accepted; the primary killed (``kill -9``).
    Without a replica it is started again, empty, a second later; with one the Sentinel
    promotes the replica. Either way bookings pause (503) and go on, and the ten end
    confirmed, once."""
    primary_port, sentinel_port = ports[:2]
    replica = len(ports) == 3
    url = f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0"
    async with running(settings.replace(redis_url=url)) as (instance, c):
        # Ten requests accepted; the primary killed at once, whatever of them is done.
        event_id, seats, auth, buyers, accepted = await one_booked_ten_queued(c)
        processes[0].kill()
        processes[0].wait()
        killed = time.monotonic()
        during = await book(c, auth, {"event_id": event_id, "seat_ids": seats[20:21]}, headers={})
        assert during.status_code == 503, during.text
        assert during.headers["retry-after"]
        if not replica:
            await asyncio.sleep(1.0)
            processes[0] = redis_server(folder, primary_port)  # empty: it kept nothing
            wait_for(lambda: cli(primary_port, "ping").strip() == "PONG", "the primary again")
        restarted = time.monotonic()

        # New bookings are accepted again...
        after = await accepted_again(c, auth, event_id, seats[21], restarted)
        back = time.monotonic() - restarted
        # ...and they, and what was accepted before, end confirmed, once. (The test payment
        # provider keeps its ledger in Redis: charges that met the outage may have opened its
        # circuit breaker, which holds charges for 10 s.)
        accepted.append(after.json()["request_id"])
        states = await final_states(instance.state.db, accepted)
        finished = time.monotonic() - restarted
        assert states == dict.fromkeys(accepted, "CONFIRMED")
        sold = await instance.state.db.fetchval(
            "SELECT count(*) FROM event_seats WHERE event_id = $1 AND status = 'sold'", event_id
        )
        assert sold == 12
        for who, request_id in zip([*buyers, auth], accepted, strict=True):
            status = await request_status(c, who, request_id)
            assert status.json()["status"] == "confirmed", status.text
        logged = [r.getMessage() for r in caplog.records]
        again = [m for m in logged if "Redis had lost them" in m]
        circuit = any("circuit open" in m for m in logged)
        what = "the primary killed" if replica else f"down {restarted - killed:.2f} s, restarted"
        print(
            f"{what}; bookings accepted again {back:.2f} s after, all accepted confirmed "
            f"{finished:.2f} s after; recovery: {again or 'nothing lost'}; the test provider's "
            f"circuit {'opened' if circuit else 'stayed closed'}"
        )
