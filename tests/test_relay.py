"""The outbox relay: woken by a notification when idle, polling while writers are about to
commit or when a notification was lost, surviving its connection, and publishing the seat
changes of one event in one pass as one delta."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid

import pytest
import redis.asyncio as aioredis

from bilten import db, keys, outbox
from tests.test_bookings import buyer, published_event
from tests.test_realtime import FAST, receive, seat_map, socket_to, subscribe


class Listener:
    """A Redis subscriber that notes when each message arrived."""

    def __init__(self, redis: aioredis.Redis, *channels: str) -> None:
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.channels = channels
        self.arrived: list[tuple[float, str, dict]] = []
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Listener:
        await self.pubsub.subscribe(*self.channels)
        self.task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.pubsub.aclose()

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "message":
                self.arrived.append(
                    (time.monotonic(), message["channel"].decode(), json.loads(message["data"]))
                )

    async def next(self, count: int = 1, timeout: float = 5.0) -> list[tuple[float, str, dict]]:
        """Wait until ``count`` messages more than were taken before have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.arrived) < count:
                await asyncio.sleep(0.001)
        taken, self.arrived = self.arrived[:count], self.arrived[count:]
        return taken


@contextlib.asynccontextmanager
async def running(relay: outbox.Relay):
    stop = asyncio.Event()
    task = asyncio.create_task(relay(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


@pytest.fixture
async def writer(database_url):
    conn = await db.connect(database_url)
    await conn.execute("TRUNCATE outbox")
    yield conn
    await conn.close()


def seat_row(event_id: str, seat: str, status: str, version: int) -> list[outbox.Row]:
    return outbox.seat_rows(event_id, [(seat, status, version)])


async def test_an_idle_relay_is_woken_at_the_commit(database_url, redis, writer):
    event_id = str(uuid.uuid4())
    relay = outbox.Relay(database_url, redis, fallback=5.0)
    latencies = []
    async with Listener(redis, keys.seats_channel(event_id)) as heard, running(relay):
        for n in range(8):
            await until(lambda: relay.waiting)
            woken = relay.wakeups
            async with writer.transaction():
                await outbox.add_many(writer, seat_row(event_id, f"s{n}", "held", n + 1))
            committed = time.monotonic()
            [(arrived, _, message)] = await heard.next()
            assert message["version"] == n + 1
            latencies.append(max(0.0, arrived - committed))
            assert relay.wakeups > woken  # by the notification, not by polling
    # The old relay polled an idle table every 100 ms; a notification takes a few.
    assert sum(1 for t in latencies if t < 0.05) >= 6, latencies
    assert statistics.median(latencies) < 0.025, latencies


async def test_a_writer_that_shares_the_idle_lock_holds_the_relay_to_polling(
    database_url, redis, writer
):
    event_id = str(uuid.uuid4())
    async with Listener(redis, keys.seats_channel(event_id)) as heard:
        transaction = writer.transaction()
        await transaction.start()
        await outbox.add_many(writer, seat_row(event_id, "a", "held", 1))  # the lock, shared
        relay = outbox.Relay(database_url, redis, fallback=5.0)
        async with running(relay):
            await until(lambda: relay.leader)
            began = time.monotonic()
            while time.monotonic() - began < 0.2:
                assert not relay.waiting  # a writer is between its insert and its commit
                await asyncio.sleep(0.005)
            await transaction.commit()
            committed = time.monotonic()
            [(arrived, _, message)] = await heard.next(timeout=1.0)
            assert arrived - committed < 0.2  # the next poll, not the 5 s fallback
            assert message["version"] == 1
            await until(lambda: relay.waiting)


async def test_a_lost_notification_delays_a_row_to_the_next_poll(database_url, redis, writer):
    event_id = str(uuid.uuid4())
    relay = outbox.Relay(database_url, redis, fallback=0.3)
    async with Listener(redis, keys.seats_channel(event_id)) as heard, running(relay):
        await until(lambda: relay.waiting)
        async with writer.transaction():
            # Triggers off for this transaction: as if its notification were lost.
            await writer.execute("SET LOCAL session_replication_role = replica")
            await outbox.add_many(writer, seat_row(event_id, "a", "held", 1))
        committed = time.monotonic()
        [(arrived, _, _)] = await heard.next(timeout=2.0)
        assert arrived - committed < 1.0
    assert await writer.fetchval("SELECT count(*) FROM outbox") == 0


async def test_rows_are_relayed_when_the_listening_connection_is_killed(
    database_url, redis, writer
):
    event_id = str(uuid.uuid4())
    relay = outbox.Relay(database_url, redis, fallback=5.0)
    async with Listener(redis, keys.seats_channel(event_id)) as heard, running(relay):
        await until(lambda: relay.waiting)
        first = relay.pid
        assert await writer.fetchval(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1", first
        ) == (outbox.APPLICATION_NAME)
        assert await writer.fetchval("SELECT pg_terminate_backend($1)", first)
        # Committed while the relay has no connection, so no notification reaches it.
        async with writer.transaction():
            await outbox.add_many(writer, seat_row(event_id, "a", "held", 1))
        [(_, _, message)] = await heard.next(timeout=3.0)  # drained once it is back
        assert message["version"] == 1
        await until(lambda: relay.waiting)
        assert relay.pid not in (None, first)
        # Listening again: the next row is woken for, not polled for.
        woken = relay.wakeups
        async with writer.transaction():
            await outbox.add_many(writer, seat_row(event_id, "b", "held", 2))
        committed = time.monotonic()
        [(arrived, _, message)] = await heard.next(timeout=3.0)
        assert message["version"] == 2 and relay.wakeups > woken
        assert arrived - committed < 1.0
    assert await writer.fetchval("SELECT count(*) FROM outbox") == 0


async def test_one_relay_at_a_time_and_another_takes_over(database_url, redis, writer):
    event_id = str(uuid.uuid4())
    first = outbox.Relay(database_url, redis, fallback=0.2)
    second = outbox.Relay(database_url, redis, fallback=0.2)
    async with Listener(redis, keys.seats_channel(event_id)) as heard:
        stop_first = asyncio.Event()
        first_task = asyncio.create_task(first(stop_first))
        await until(lambda: first.waiting)
        async with running(second):
            await until(lambda: second.pid is not None)
            async with writer.transaction():
                await outbox.add_many(writer, seat_row(event_id, "a", "held", 1))
            await heard.next()
            assert first.leader and not second.leader
            stop_first.set()
            await asyncio.wait_for(first_task, 5)
            await until(lambda: second.waiting, timeout=2)  # within its fallback
            async with writer.transaction():
                await outbox.add_many(writer, seat_row(event_id, "b", "held", 2))
            [(_, _, message)] = await heard.next()
            assert message["version"] == 2
        await asyncio.sleep(0.1)
        assert heard.arrived == []  # each row once


def test_the_seat_changes_of_an_event_in_one_pass_are_one_delta():
    e, f = str(uuid.uuid4()), str(uuid.uuid4())
    rows: list[outbox.Row] = [
        *seat_row(e, "s1", "held", 10),
        ("user", {"user_id": "u1", "message": {"type": "booking.result", "status": "confirmed"}}),
        *outbox.seat_rows(e, [("s2", "held", 12), ("s3", "held", 11)]),
        *seat_row(f, "t1", "sold", 13),
        ("catalog", {"event_id": e}),
        *seat_row(e, "s1", "available", 14),  # the same seat again: its latest change only
    ]
    published = [
        (channel, data.decode() if channel == keys.CATALOG_CHANGED else json.loads(data))
        for channel, data in outbox.messages_of(rows)
    ]
    assert published == [
        (
            keys.seats_channel(e),
            {
                "type": "seats",
                "event_id": e,
                "version": 14,
                "changes": [
                    {"seat_id": "s1", "status": "available", "version": 14},
                    {"seat_id": "s2", "status": "held", "version": 12},
                    {"seat_id": "s3", "status": "held", "version": 11},
                ],
            },
        ),
        (keys.user_channel("u1"), {"type": "booking.result", "status": "confirmed"}),
        (
            keys.seats_channel(f),
            {
                "type": "seats",
                "event_id": f,
                "version": 13,
                "changes": [{"seat_id": "t1", "status": "sold", "version": 13}],
            },
        ),
        (keys.CATALOG_CHANGED, e),
        (keys.CATALOG_CHANGED, f),
    ]


def test_a_batchs_messages_in_one_row_go_each_to_its_users_channel_in_order():
    e = str(uuid.uuid4())
    notes = [
        {"user_id": f"u{n}", "message": {"type": "booking.result", "booking_id": f"b{n}"}}
        for n in range(3)
    ]
    rows: list[outbox.Row] = [
        ("user", {"user_id": "u9", "message": {"type": "payment.status"}}),
        *seat_row(e, "s1", "sold", 3),
        ("users", notes),
        ("user", {"user_id": "u0", "message": {"type": "notification"}}),
    ]
    published = [
        (channel, data.decode() if channel == keys.CATALOG_CHANGED else json.loads(data))
        for channel, data in outbox.messages_of(rows)
    ]
    assert published == [
        (keys.user_channel("u9"), {"type": "payment.status"}),
        (keys.seats_channel(e), json.loads(outbox.messages_of(seat_row(e, "s1", "sold", 3))[0][1])),
        *((keys.user_channel(n["user_id"]), n["message"]) for n in notes),
        (keys.user_channel("u0"), {"type": "notification"}),
        (keys.CATALOG_CHANGED, e),
    ]


def test_a_long_pass_splits_an_events_delta(monkeypatch):
    monkeypatch.setattr(outbox, "MERGE_MAX", 2)
    e = str(uuid.uuid4())
    rows = [r for n in range(5) for r in seat_row(e, f"s{n}", "held", n + 1)]
    deltas = [
        json.loads(data)
        for channel, data in outbox.messages_of(rows)
        if channel == keys.seats_channel(e)
    ]
    assert [d["version"] for d in deltas] == [2, 4, 5]
    assert [c["seat_id"] for d in deltas for c in d["changes"]] == [f"s{n}" for n in range(5)]


@pytest.mark.slow
async def test_watchers_get_one_delta_per_pass_and_end_where_the_database_is(
    spawn_server, database_url, redis, writer
):
    import httpx

    # No relay in this instance: the test makes the pass.
    server = spawn_server(BILTEN_ROLES="api,realtime", **FAST)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        event_id, seats, _, _ = await published_event(http)
        async with socket_to(server) as ws:
            seen = await subscribe(ws, event_id)
            assert seen[0]["type"] == "seats.snapshot"
            first, second = await buyer(http), await buyer(http)
            holds = []
            for auth, wanted in ((first, seats[:2]), (second, seats[2:5]), (first, seats[5:6])):
                hold = await http.post(
                    "/holds", headers=auth, json={"event_id": event_id, "seat_ids": wanted}
                )
                assert hold.status_code == 201, hold.text
                holds.append(hold.json()["id"])
            released = await http.delete(f"/holds/{holds[0]}", headers=first)
            assert released.status_code == 204
            assert await writer.fetchval("SELECT count(*) FROM outbox") == 4

            assert await outbox.relay_once(writer, redis) == 4
            delta = await receive(ws)
            assert delta["type"] == "seats" and delta["event_id"] == event_id
            assert sorted(c["seat_id"] for c in delta["changes"]) == sorted(seats[:6])
            versions = await writer.fetch(
                "SELECT seat_id::text, status, version FROM event_seats WHERE event_id = $1",
                uuid.UUID(event_id),
            )
            assert delta["version"] == max(r["version"] for r in versions)
            with pytest.raises(TimeoutError):
                await receive(ws, timeout=0.3)  # one message for the whole pass
            assert seat_map([*seen[:1], delta]) == {r["seat_id"]: r["status"] for r in versions}

            # A client that resubscribes with the version it had gets the same delta again.
            replay = await subscribe(ws, event_id, seen[-1]["version"])
            assert [m["type"] for m in replay] == ["seats", "subscribed"]
            assert replay[0] == delta and replay[-1]["version"] == delta["version"]


async def test_a_batch_tells_its_buyers_from_one_outbox_row_a_step(settings):
    """Three bookings confirmed and one refused (its seat held meanwhile) in one batch: the
    refusal's step and the confirmations' step each write one ``users`` row, and the relay
    publishes each result to its buyer's channel."""
    from bilten.sagas import batch
    from tests.test_bookings import book, queued
    from tests.test_catalog import running as instance

    async with instance(settings.replace(roles=frozenset({"api"}))) as (door, c):
        state = door.state
        event_id, seats, _, _ = await published_event(c)
        for n in range(4):
            body = {"event_id": event_id, "seat_ids": [seats[min(n, 3)]]}
            answer = await book(c, await buyer(c), body, headers={})
            assert answer.status_code == 202, answer.text
        held = await c.post(
            "/holds", headers=await buyer(c), json={"event_id": event_id, "seat_ids": seats[3:4]}
        )
        assert held.status_code == 201, held.text
        entries = await queued(state, event_id)
        channels = {keys.user_channel(e.request.user_id) for e in entries}
        await state.db.execute("DELETE FROM outbox")
        async with Listener(state.redis, *channels) as heard:
            outcomes = await batch.run_batch(state, entries)
            assert [o.state for o in outcomes] == ["CONFIRMED"] * 3 + ["FAILED"]
            rows = await state.db.fetch(
                "SELECT topic, payload FROM outbox WHERE topic LIKE 'user%' ORDER BY id"
            )
            assert [r["topic"] for r in rows] == ["users", "users"]
            assert [len(r["payload"]) for r in rows] == [1, 3]
            async with state.db.acquire() as conn:
                while await outbox.relay_once(conn, state.redis):
                    pass
            got = await heard.next(4)
        assert sorted((channel, m["booking_id"], m["status"]) for _, channel, m in got) == sorted(
            (keys.user_channel(e.request.user_id), e.request_id, o.state.lower())
            for e, o in zip(entries, outcomes, strict=True)
        )
