"""The WebSocket hub against real instances sharing one PostgreSQL and one Redis.

Three ``bilten serve`` processes run for the whole module: A and B with the usual limits, C
with tight ones (a tiny send queue, two subscriptions, short history, one second of idleness).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid

import httpx
import pytest
import websockets
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from bilten.realtime.history import History
from bilten.realtime.messages import frame
from bilten.settings import Settings
from tests.catalog_helpers import admin_signed_in, register
from tests.conftest import TEST_SECRET, Server, free_port, server_env, serving
from tests.test_bookings import book, buyer, draft_event, published_event

pytestmark = pytest.mark.slow

FAST = dict(
    BILTEN_ARGON2_TIME_COST="1",
    BILTEN_ARGON2_MEMORY_KIB="1024",
    BILTEN_ARGON2_PARALLELISM="1",
    BILTEN_LIMIT_REGISTER_IP="0/3600",
    BILTEN_LIMIT_API_IP="0/60",
    BILTEN_LOG_FORMAT="text",
)
TIGHT = dict(
    BILTEN_WS_SEND_QUEUE="4",
    BILTEN_WS_MAX_SUBSCRIPTIONS="2",
    BILTEN_WS_MAX_MESSAGE="512",
    BILTEN_WS_HISTORY="2",
    BILTEN_WS_IDLE_TIMEOUT="1",
    BILTEN_WS_MAX_RATE="1000",  # the slow-reader test sends a burst of subscriptions
)


@pytest.fixture(scope="module")
def module_settings(database_url, services) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=services.redis_url,
        secret_key=TEST_SECRET,
        argon2_time_cost=1,
        argon2_memory_kib=1024,
        argon2_parallelism=1,
    )


@pytest.fixture(scope="module")
def servers(module_settings, tmp_path_factory):
    """A, B and C, started side by side."""
    folder = tmp_path_factory.mktemp("realtime")
    named = [
        (name, free_port(), server_env(module_settings, **FAST, **extra))
        for name, extra in (("a", {}), ("b", {}), ("c", TIGHT))
    ]
    with serving(folder, named) as started:
        yield started


@pytest.fixture
def a(servers):
    return servers[0]


@pytest.fixture
def b(servers):
    return servers[1]


@pytest.fixture
def c(servers):
    return servers[2]


@pytest.fixture
async def http(a):
    async with httpx.AsyncClient(base_url=a.url, timeout=15) as client:
        yield client


def ws_url(server: Server, token: str | None = None) -> str:
    url = server.url.replace("http://", "ws://") + "/ws"
    return f"{url}?token={token}" if token else url


def token_of(auth: dict[str, str]) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


@contextlib.asynccontextmanager
async def socket_to(server: Server, token: str | None = None, **options):
    async with connect(ws_url(server, token), proxy=None, compression=None, **options) as ws:
        hello = await receive(ws)
        assert hello["type"] == "hello", hello
        yield ws


async def receive(ws: ClientConnection, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def receive_until(ws: ClientConnection, kind: str, timeout: float = 5.0, **fields) -> dict:
    """The next message of type ``kind`` (with ``fields``), skipping others."""
    async with asyncio.timeout(timeout):
        while True:
            message = await receive(ws, timeout)
            if message["type"] == kind and all(message.get(k) == v for k, v in fields.items()):
                return message


async def drain(ws: ClientConnection, seconds: float) -> list[dict]:
    """Everything that arrives within ``seconds``."""
    found = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                found.append(await receive(ws, seconds))
    return found


async def subscribe(
    ws: ClientConnection, event_id: str, version: int | None = None, **options
) -> list[dict]:
    """Subscribe; returns what came up to and including the ``subscribed`` acknowledgement."""
    request = {"type": "subscribe", "room": f"event:{event_id}", **options}
    if version is not None:
        request["version"] = version
    await ws.send(json.dumps(request))
    found = []
    while True:
        message = await receive(ws)
        found.append(message)
        if message["type"] in ("subscribed", "error"):
            return found


def seat_map(messages: list[dict]) -> dict[str, str]:
    """Seat statuses from a snapshot and the deltas after it, applied per seat by version."""
    statuses = {s["id"]: s["status"] for s in messages[0]["seats"]}
    versions = dict.fromkeys(statuses, 0)
    for message in messages[1:]:
        for change in message.get("changes", ()):
            if change["version"] > versions[change["seat_id"]]:
                statuses[change["seat_id"]] = change["status"]
                versions[change["seat_id"]] = change["version"]
    return statuses


def seat_statuses(message: dict) -> dict[str, str]:
    return {change["seat_id"]: change["status"] for change in message["changes"]}


async def test_a_hold_on_a_reaches_an_anonymous_watcher_on_b_and_its_release_too(a, b, http):
    event_id, seats, _, _ = await published_event(http)
    async with socket_to(b) as watcher:
        first = await subscribe(watcher, event_id)
        assert [m["type"] for m in first] == ["seats.snapshot", "subscribed"]
        snapshot = first[0]
        assert snapshot["event_id"] == event_id
        assert {s["id"] for s in snapshot["seats"]} == set(seats)
        assert first[1] == {
            "type": "subscribed",
            "room": f"event:{event_id}",
            "version": snapshot["version"],
        }
        auth = await buyer(http)
        began = time.monotonic()
        hold = await http.post(
            "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
        )
        assert hold.status_code == 201, hold.text
        delta = await receive_until(watcher, "seats", timeout=1.0)
        assert time.monotonic() - began < 1.0
        assert delta["event_id"] == event_id and delta["version"] > snapshot["version"]
        assert seat_statuses(delta) == {seats[0]: "held", seats[1]: "held"}

        began = time.monotonic()
        released = await http.delete(f"/holds/{hold.json()['id']}", headers=auth)
        assert released.status_code == 204, released.text
        delta = await receive_until(watcher, "seats", timeout=1.0)
        assert time.monotonic() - began < 1.0
        assert seat_statuses(delta) == {seats[0]: "available", seats[1]: "available"}


async def test_seats_of_a_queued_booking_are_told_at_once_and_given_back_when_it_fails(a, b, http):
    """A booking's seats are told to the room as the request is queued (``seats.claimed``), on
    every instance, before they sell; a refused request tells nothing; a booking that fails
    gives its seats back (``seats.released``). A joiner's catch-up holds none of this news."""
    event_id, seats, _, _ = await published_event(http)
    auth = await buyer(http)
    async with socket_to(b) as watcher:
        version = (await subscribe(watcher, event_id))[0]["version"]
        sold = await book(http, auth, {"event_id": event_id, "seat_ids": seats[:2]})
        assert sold.status_code == 201, sold.text
        claimed = await receive_until(watcher, "seats.claimed", timeout=2.0)
        assert claimed == {"type": "seats.claimed", "event_id": event_id, "seat_ids": seats[:2]}

        refused = await book(http, auth, {"event_id": event_id, "seat_ids": [seats[0], seats[3]]})
        assert refused.status_code == 409, refused.text
        declined = await http.post(
            "/bookings",
            json={
                "event_id": event_id,
                "seat_ids": [seats[2]],
                "payment": {"method": "card", "token": "tok_chargeDeclined"},
            },
            headers={**auth, "Idempotency-Key": uuid.uuid4().hex, "Prefer": "wait=10"},
        )
        assert declined.status_code == 402, declined.text
        news = []
        async with asyncio.timeout(5):
            while not news or news[-1] != ("seats.released", [seats[2]]):
                message = await receive(watcher)
                if message["type"] in ("seats.claimed", "seats.released"):
                    news.append((message["type"], message["seat_ids"]))
        # Claimed and given back within one gathering interval, only the release is told.
        assert news in ([("seats.claimed", [seats[2]]), news[-1]], [news[-1]])
        assert seats[3] not in str(news)  # the refused request claimed nothing

    async with socket_to(a) as joiner:
        caught_up = await subscribe(joiner, event_id, version)
        assert {m["type"] for m in caught_up} <= {"seats", "seats.snapshot", "subscribed"}


def unindexed(message: dict, order: list[str]) -> dict[str, tuple[str, int]]:
    """A ``seats.indexed`` message as each seat's status and version."""
    found = {}
    for status, pairs in message["changes"].items():
        for at, age in zip(pairs[::2], pairs[1::2], strict=True):
            found[order[at]] = (status, message["version"] - age)
    return found


def by_seat(message: dict) -> dict[str, tuple[str, int]]:
    return {c["seat_id"]: (c["status"], c["version"]) for c in message["changes"]}


async def test_a_watcher_naming_seats_by_index_gets_the_same_news_in_fewer_bytes(a, b, http):
    """``"indexed": true``: seats named by their place in the snapshot's list, in deltas, in
    news of claims and in a joiner's catch-up; beside it, a watcher of the same room gets the
    usual messages."""
    event_id, seats, _, _ = await published_event(http)
    auth = await buyer(http)

    def changes(messages: list[dict], order: list[str] | None = None) -> list[tuple]:
        """Each delta's version and changes, by version (arrival order may differ)."""
        kind = "seats" if order is None else "seats.indexed"
        return sorted(
            (m["version"], sorted((by_seat(m) if order is None else unindexed(m, order)).items()))
            for m in messages
            if m["type"] == kind
        )

    async with socket_to(b) as plain, socket_to(b) as compact:
        first = await subscribe(plain, event_id)
        version = first[0]["version"]
        snapshot, *caught_up = await subscribe(compact, event_id, indexed=True)
        assert snapshot["type"] == "seats.snapshot"  # the snapshot is as ever: it names seats
        order = [seat["id"] for seat in snapshot["seats"]]
        assert all(m["type"] in ("seats.indexed", "subscribed") for m in caught_up)

        hold = await http.post(
            "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
        )
        assert hold.status_code == 201, hold.text
        sold = await book(http, auth, {"event_id": event_id, "seat_ids": seats[2:4]})
        assert sold.status_code == 201, sold.text
        told = first + await drain(plain, 1.5)
        raws = []
        with contextlib.suppress(TimeoutError):
            while True:
                raws.append(await asyncio.wait_for(compact.recv(), 1.5))
        short = caught_up + [json.loads(raw) for raw in raws]

    assert not any(m["type"].endswith(".indexed") for m in told)
    assert not any(m["type"] in ("seats", "seats.claimed", "seats.released") for m in short)
    assert changes(short, order) == [c for c in changes(told) if c[0] > snapshot["version"]]
    held = next(m for m in told if m["type"] == "seats" and seats[0] in str(m))
    assert seat_statuses(held) == dict.fromkeys(seats[:2], "held")
    same = next(r for r in raws if json.loads(r).get("version") == held["version"])
    assert len(same) < len(json.dumps(held, separators=(",", ":"))) / 2
    claimed = next(m for m in told if m["type"] == "seats.claimed")
    assert {
        "type": "claims.indexed",
        "event_id": event_id,
        "claimed": [order.index(s) for s in claimed["seat_ids"]],
        "released": [],
    } in short

    # A joiner that had a version is caught up in its form (from the history of the room,
    # which lingers on B).
    async with socket_to(b) as joiner:
        *missed, done = await subscribe(joiner, event_id, version, indexed=True)
        assert done["type"] == "subscribed"
        assert {m["type"] for m in missed} == {"seats.indexed"}
        assert changes(missed, order) == changes(told)
        # Asking again without: the usual messages from then on.
        again = await subscribe(joiner, event_id, done["version"])
        assert [m["type"] for m in again] == ["subscribed"]
        released = await http.delete(f"/holds/{hold.json()['id']}", headers=auth)
        assert released.status_code == 204, released.text
        freed = await receive_until(joiner, "seats")
        assert by_seat(freed).keys() == set(seats[:2])


class Member:
    """A room member that notes the text of each frame it is given."""

    def __init__(self):
        self.got: list[str] = []

    def offer(self, f):
        self.got.append(f.event["text"])
        return True

    def offer_all(self, frames, joined):
        self.got += [f.event["text"] for f in frames]
        return True


async def test_a_snapshot_by_index_for_a_joiner_that_knows_the_seats_order(b, http):
    """A joiner by index whose version the room cannot reach back to needs a snapshot: having
    named a version, it holds a seat map, so it gets every seat by index (each with its own
    version) in a fraction of the bytes; one that named no version gets the snapshot."""
    event_id, seats, _, _ = await published_event(http)
    auth = await buyer(http)
    hold = await http.post(
        "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
    )
    assert hold.status_code == 201, hold.text
    sold = await book(http, auth, {"event_id": event_id, "seat_ids": seats[2:3]})
    assert sold.status_code == 201, sold.text
    async with socket_to(b) as plain, socket_to(b) as compact:
        snapshot, *_ = await subscribe(plain, event_id)
        order = [seat["id"] for seat in snapshot["seats"]]
        expected = {seat["id"]: (seat["status"], seat["version"]) for seat in snapshot["seats"]}
        assert {status for status, _ in expected.values()} == {"available", "held", "sold"}
        raw = []
        await compact.send(
            json.dumps(
                {"type": "subscribe", "room": f"event:{event_id}", "version": 1, "indexed": True}
            )
        )
        while not raw or json.loads(raw[-1])["type"] != "subscribed":
            raw.append(await asyncio.wait_for(compact.recv(), 5))
        whole, *_, done = [json.loads(r) for r in raw]
        assert whole["type"] == "seats.indexed" and whole["version"] == snapshot["version"]
        assert unindexed(whole, order) == expected
        assert done["version"] >= snapshot["version"]
        assert len(raw[0]) * 4 < len(json.dumps(snapshot, separators=(",", ":")))
        fresh = await subscribe(compact, event_id, indexed=True)
        assert fresh[0]["type"] == "seats.snapshot" and fresh[-1]["type"] == "subscribed"


async def test_snapshots_sent_again_reach_members_by_index_by_index():
    """After a lost pub/sub connection a room sends its snapshot again: by index to the
    members that name seats so (all of them had a seat map), made once for all of them."""
    from bilten.realtime import messages
    from bilten.realtime.rooms import Room

    room = Room("e1", history=4)
    seats = [
        {"id": f"s{n}", "status": "held" if n == 1 else "available", "version": n} for n in range(3)
    ]
    body = json.dumps({"event_id": "e1", "version": 7, "seats": seats}).encode()
    frame = messages.snapshot(body)
    plain, compact, other = Member(), Member(), Member()
    room.join(plain)
    room.join(compact, indexed=True)
    room.join(other, indexed=True)
    room.broadcast(frame, snapshot=True)
    for _ in range(4):
        await asyncio.sleep(0)
    assert json.loads(plain.got[0])["type"] == "seats.snapshot"
    assert [json.loads(m) for m in compact.got] == [
        {
            "type": "seats.indexed",
            "event_id": "e1",
            "version": 7,
            "changes": {"available": [0, 7, 2, 5], "held": [1, 6]},
        }
    ]
    assert other.got == compact.got and room.whole(frame) is frame.indexed


@given(
    st.lists(
        st.tuples(st.sampled_from(["available", "held", "sold"]), st.integers(0, 10**6)),
        max_size=300,
    )
)
def test_a_snapshot_by_index_names_every_seat_as_it_was(seats):
    from bilten.realtime import indexed

    order = [str(uuid.UUID(int=n)) for n in range(len(seats))]
    version = max((v for _, v in seats), default=0) + 1
    body = {
        "type": "seats.snapshot",
        "event_id": "e",
        "version": version,
        "seats": [
            {"id": i, "x": 1.5, "status": st_, "version": v}
            for i, (st_, v) in zip(order, seats, strict=True)
        ],
    }
    whole = json.loads(indexed.snapshot(json.dumps(body).encode()))
    assert whole["type"] == "seats.indexed" and whole["version"] == version
    assert unindexed(whole, order) == {i: s for i, s in zip(order, seats, strict=True)}


async def test_a_delta_not_as_published_goes_to_members_by_id_and_is_logged(caplog):
    """One odd message on a room's channel fails alone: the members by index miss it."""
    from bilten.realtime.rooms import Room

    room = Room("e1", history=4)
    room.index = {"s1": 0}
    plain, compact = Member(), Member()
    room.join(plain)
    room.join(compact, indexed=True)
    odd = b'{"type":"seats","event_id":"e1","version":3,"changes":"s1"}'
    change = {"seat_id": "s1", "status": "held", "version": 4}
    good = json.dumps({"type": "seats", "event_id": "e1", "version": 4, "changes": [change]})
    good = good.encode()
    room.on_message(odd)
    room.on_message(good)
    for _ in range(4):
        await asyncio.sleep(0)
    assert plain.got == [odd.decode(), good.decode()]
    assert [json.loads(m) for m in compact.got] == [
        {"type": "seats.indexed", "event_id": "e1", "version": 4, "changes": {"held": [0, 0]}}
    ]
    assert "not as published" in caplog.text
    assert len(room.catch_up(None, room.history.after(0), True)) == 1


def test_the_indexed_form_of_a_delta_and_of_news():
    from bilten.realtime import indexed

    index = {"s0": 0, "s1": 1, "s2": 2}
    seat_map = b'{"event_id":"e","version":9,"seats":[{"id":"s0","x":1},{"id":"s1"},{"id":"s2"}]}'
    assert indexed.seat_index(seat_map) == index
    delta = json.dumps(
        {
            "type": "seats",
            "event_id": "e",
            "version": 12,
            "changes": [
                {"seat_id": "s2", "status": "sold", "version": 12},
                {"seat_id": "s0", "status": "sold", "version": 10},
                {"seat_id": "zz", "status": "sold", "version": 11},  # not of the map: left out
                {"seat_id": "s1", "status": "available"},
            ],
        }
    ).encode()
    assert json.loads(indexed.delta(delta, index)) == {
        "type": "seats.indexed",
        "event_id": "e",
        "version": 12,
        "changes": {"sold": [2, 0, 0, 2], "available": [1, 0]},
    }
    assert json.loads(indexed.claims("e", ["s1", "zz"], ["s0"], index)) == {
        "type": "claims.indexed",
        "event_id": "e",
        "claimed": [1],
        "released": [0],
    }


@given(
    seats=st.integers(1, 300),
    changes=st.lists(
        st.tuples(
            st.integers(0, 400),  # a seat's index; at or past ``seats``: not of the map
            st.sampled_from(["available", "held", "sold"]),
            st.integers(0, 50) | st.none(),  # how far below the delta's version; None: none
        ),
        max_size=60,
        unique_by=lambda c: c[0],
    ),
)
def test_a_delta_by_index_names_the_same_changes(seats, changes):
    """Any delta, put by index and read back against the map's order, is the same changes
    (a version-less change as the delta's version), seats not of the map left out."""
    from bilten.realtime import indexed

    order = [str(uuid.UUID(int=n)) for n in range(seats)]
    index = {seat: n for n, seat in enumerate(order)}
    version = 1000
    published = [
        {"seat_id": order[n] if n < seats else str(uuid.UUID(int=10_000 + n)), "status": status}
        | ({} if age is None else {"version": version - age})
        for n, status, age in changes
    ]
    delta = {"type": "seats", "event_id": "e", "version": version, "changes": published}
    short = json.loads(indexed.delta(json.dumps(delta).encode(), index))
    assert short["type"] == "seats.indexed" and short["version"] == version
    expected = {
        c["seat_id"]: (c["status"], c.get("version", version))
        for c in published
        if c["seat_id"] in index
    }
    assert unindexed(short, order) == expected


async def test_news_of_claims_is_gathered_per_seat_and_told_in_two_frames():
    from bilten.claimnews import Claimed, Gathering, Released, decode

    told: list[tuple[list[str], list[str]]] = []
    gathering = Gathering("e1", lambda claimed, released: told.append((claimed, released)), 0.01)
    gathering.add(Claimed("e1", ["s1", "s2", "s3"]))
    gathering.add(Released("e1", ["s2", "s4"]))
    gathering.add(Claimed("e1", ["s4"]))
    assert told == []  # not before the interval
    await asyncio.sleep(0.03)
    # Each seat as its latest news has it: claims in one frame, releases in the other.
    assert told == [(["s1", "s3", "s4"], ["s2"])]
    assert [decode(m) for m in gathering.frames(*told[0])] == [
        Claimed("e1", ["s1", "s3", "s4"]),
        Released("e1", ["s2"]),
    ]
    assert [decode(m) for m in gathering.frames([], ["s9"])] == [Released("e1", ["s9"])]
    gathering.add(Released("e1", ["s1"]))
    gathering.cancel()  # the room closed
    await asyncio.sleep(0.03)
    assert len(told) == 1


async def test_a_room_keeps_news_of_claims_out_of_its_history_and_drops_malformed_news(caplog):
    from bilten.realtime.rooms import Room

    room = Room("e1", history=4)
    room.on_message(b'{"type":"seats.claimed","event_id":"e1"}')  # no seat_ids
    room.on_message(b'{"type":"seats.released","event_id":"e1","seat_ids":"s1"}')
    assert "malformed news of claims" in caplog.text and room.news.seats == {}
    room.on_message(b'{"type":"seats.claimed","event_id":"e1","seat_ids":["s1"]}')
    assert room.news.seats == {"s1": True} and len(room.history) == 0
    room.news.cancel()


async def test_a_booking_result_reaches_its_owner_on_b_and_nobody_else(a, b, http):
    event_id, seats, _, _ = await published_event(http)
    owner = await buyer(http)
    other = await buyer(http)
    async with (
        socket_to(b, token_of(owner)) as mine,
        connect(ws_url(b), additional_headers=other, proxy=None) as theirs,
        socket_to(b) as watcher,
    ):
        assert (await receive(theirs))["user_id"] is not None  # hello, authenticated by header
        await subscribe(watcher, event_id)
        await subscribe(mine, event_id)
        response = await book(http, owner, {"event_id": event_id, "seat_ids": seats[:1]})
        assert response.status_code == 201, response.text
        booking_id = response.json()["booking"]["id"]

        result = await receive_until(mine, "booking.result", timeout=2.0)
        assert result == {
            "type": "booking.result",
            "request_id": booking_id,
            "booking_id": booking_id,
            "status": "confirmed",
        }
        # The queue was served: its room hears the counter move (at most once a second).
        served = await receive_until(watcher, "queue.served", timeout=3.0)
        assert served["event_id"] == event_id and served["served"] >= 1

        leaked = [
            m for m in await drain(theirs, 0.3) if m["type"] in ("booking.result", "queue.position")
        ]
        leaked += [
            m
            for m in await drain(watcher, 0.1)
            if m["type"] in ("booking.result", "queue.position")
        ]
        assert leaked == []


async def test_the_owner_hears_its_queue_position_with_its_ticket(b, http):
    event_id, seats, _, _ = await published_event(http)
    owner = await buyer(http)
    async with socket_to(b, token_of(owner)) as mine:
        response = await book(
            http, owner, {"event_id": event_id, "seat_ids": seats[:1]}, headers={}
        )
        assert response.status_code in (201, 202), response.text
        request_id = (response.json().get("request_id")) or response.json()["booking"]["id"]
        position = await receive_until(mine, "queue.position", timeout=2.0)
        assert position["request_id"] == request_id and position["event_id"] == event_id
        assert position["position"] >= 1 and position["ticket"] >= position["position"]
        await receive_until(mine, "booking.result", timeout=5.0, request_id=request_id)


async def test_garbage_tokens_are_refused_before_the_upgrade(a):
    for kwargs in (
        {"uri": ws_url(a, "garbage")},
        {"uri": ws_url(a), "additional_headers": {"Authorization": "Bearer garbage"}},
        {"uri": ws_url(a), "additional_headers": {"Authorization": "Basic Zm9vOmJhcg=="}},
    ):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(proxy=None, **kwargs):
                pass
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["error"]["code"] == "unauthorized"


async def test_a_token_in_a_first_auth_message(a, http):
    auth, user_id = await register(http, f"auth-{uuid.uuid4().hex[:8]}@example.com")
    async with socket_to(a) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token_of(auth)}))
        assert await receive(ws) == {"type": "authenticated", "user_id": user_id}
        # A fresh token of the same user: authenticated again, in place.
        await ws.send(json.dumps({"type": "auth", "token": token_of(auth)}))
        assert await receive(ws) == {"type": "authenticated", "user_id": user_id}
        # Someone else's token does not take the connection over.
        other, _ = await register(http, f"auth-{uuid.uuid4().hex[:8]}@example.com")
        await ws.send(json.dumps({"type": "auth", "token": token_of(other)}))
        assert (await receive(ws))["code"] == "bad_request"
    async with socket_to(a) as ws:
        await ws.send(json.dumps({"type": "auth", "token": "garbage"}))
        assert (await receive(ws))["code"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed):
            await receive(ws)
        assert ws.close_code == 1008


async def test_malformed_messages_get_an_error_and_the_connection_survives(a):
    async with socket_to(a) as ws:
        for bad in (
            "not json",
            '"not json"',
            "[]",
            '{"type": "dance"}',
            '{"type": "subscribe"}',
            '{"type": "subscribe", "room": "venue:1"}',
            '{"type": "subscribe", "room": "event:nope"}',
            '{"type": "subscribe", "room": "event:1", "version": -1}',
            '{"type": "subscribe", "room": "event:1", "indexed": "yes"}',
            '{"type": "subscribe", "room": "event:1", "indexed": 1}',
            '{"type": "ping", "extra": 1}',
            b"\xff\xfe binary",
        ):
            await ws.send(bad)
            error = await receive(ws)
            assert error["type"] == "error", (bad, error)
            assert error["code"] == "bad_request" and error["message"], (bad, error)
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}
        unknown = str(uuid.uuid4())
        assert (await subscribe(ws, unknown))[-1] == {
            "type": "error",
            "code": "not_found",
            "message": "No such event.",
            "room": f"event:{unknown}",
        }
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}


async def test_oversized_messages_and_too_many_subscriptions_get_errors(c, http):
    first, _, _, _ = await published_event(http)
    second, _, _, _ = await published_event(http)
    async with socket_to(c) as ws:
        await ws.send(json.dumps({"type": "ping", "pad": "x" * 600}))
        error = await receive(ws)
        assert error["code"] == "message_too_large" and "512" in error["message"]
        assert (await subscribe(ws, first))[-1]["type"] == "subscribed"
        assert (await subscribe(ws, second))[-1]["type"] == "subscribed"
        assert (await subscribe(ws, first))[-1]["type"] == "subscribed"  # a resync, not a third
        third = await subscribe(ws, str(uuid.uuid4()))
        assert third[-1]["code"] == "too_many_subscriptions"
        await ws.send(json.dumps({"type": "unsubscribe", "room": f"event:{second}"}))
        assert await receive(ws) == {"type": "unsubscribed", "room": f"event:{second}"}
        assert (await subscribe(ws, second))[-1]["type"] == "subscribed"
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}


async def test_resubscribing_with_a_version_gets_the_missed_deltas(a, b, http):
    event_id, seats, _, _ = await published_event(http)
    auth = await buyer(http)
    async with socket_to(b) as ws:
        snapshot = (await subscribe(ws, event_id))[0]
    version = snapshot["version"]
    # Nobody watches on B now; the room lingers, so what happens meanwhile is kept.
    hold = await http.post(
        "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:1]}
    )
    assert hold.status_code == 201
    second = await http.post(
        "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[1:2]}
    )
    assert second.status_code == 201
    async with socket_to(b) as ws:
        deadline = time.monotonic() + 2
        while True:  # the relay publishes within moments: resubscribe until both are there
            got = await subscribe(ws, event_id, version)
            missed = [m for m in got if m["type"] == "seats"]
            if len(missed) == 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert [m["type"] for m in got] == ["seats", "seats", "subscribed"]
        assert seat_statuses(missed[0]) | seat_statuses(missed[1]) == {
            seats[0]: "held",
            seats[1]: "held",
        }
        assert missed[0]["version"] < missed[1]["version"] == got[-1]["version"]
        # Up to date: nothing to send but the acknowledgement.
        assert await subscribe(ws, event_id, got[-1]["version"]) == [got[-1]]
        # From before the history: a fresh snapshot.
        # From before the history: a snapshot (shared while recent), then what followed it.
        fresh = await subscribe(ws, event_id, 0)
        assert fresh[0]["type"] == "seats.snapshot" and fresh[-1]["type"] == "subscribed"
        statuses = seat_map(fresh)
        assert statuses[seats[0]] == statuses[seats[1]] == "held"
        # From the future (a made-up version): a snapshot too, and the room's own version.
        future = await subscribe(ws, event_id, 10**12)
        assert future[0]["type"] == "seats.snapshot", future
        assert future[-1] == got[-1]


async def test_a_snapshot_when_the_history_no_longer_reaches_back(c, http):
    event_id, seats, _, _ = await published_event(http)
    auth = await buyer(http)
    async with socket_to(c) as ws:
        version = (await subscribe(ws, event_id))[0]["version"]
        for seat in seats[:3]:  # three deltas; C keeps two
            hold = await http.post(
                "/holds", headers=auth, json={"event_id": event_id, "seat_ids": [seat]}
            )
            assert hold.status_code == 201
            await receive_until(ws, "seats", timeout=2.0)
        again = await subscribe(ws, event_id, version)
        assert again[0]["type"] == "seats.snapshot" and again[-1]["type"] == "subscribed"
        statuses = seat_map(again)
        assert [statuses[s] for s in seats[:3]] == ["held"] * 3


async def test_a_client_that_does_not_read_is_closed_with_1013(c, http):
    event_id, _, _, _ = await published_event(http, rows=10, per_row=20)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    host, port = c.url.removeprefix("http://").split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    with sock:  # the loop's transport works on a copy of it: this one is closed here
        await _fill_until_closed(c, event_id, sock)
    async with httpx.AsyncClient(base_url=c.url) as client:
        metrics = (await client.get("/metrics")).text
    assert 'bilten_ws_closed_total{reason="slow"}' in metrics


async def _fill_until_closed(c, event_id: str, sock: socket.socket) -> None:
    async with connect(
        ws_url(c), sock=sock, proxy=None, compression=None, max_queue=1, max_size=None
    ) as ws:
        await receive(ws)  # hello
        subscribe_message = json.dumps({"type": "subscribe", "room": f"event:{event_id}"})
        for _ in range(200):  # a snapshot each, not read
            await ws.send(subscribe_message)
        received = 0
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await receive(ws)
                received += 1
        assert ws.close_code == 1013
        assert received < 400


async def test_idle_connections_are_closed(c):
    async with socket_to(c) as ws:
        began = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed):
            await receive(ws, timeout=5)
        assert ws.close_code == 4408
        assert 0.9 < time.monotonic() - began < 3.5


async def test_draft_rooms_are_for_their_organizer_only(a, http):
    event, organizer = await draft_event(http, rows=1, per_row=3, title="Draft")
    event_id = event["id"]
    stranger = await buyer(http)
    for token in (None, token_of(stranger)):
        async with socket_to(a, token) as ws:
            assert (await subscribe(ws, event_id))[-1]["code"] == "not_found"
    async with socket_to(a, token_of(organizer)) as ws:
        assert [m["type"] for m in await subscribe(ws, event_id)] == [
            "seats.snapshot",
            "subscribed",
        ]
    published = await http.post(f"/events/{event_id}/publish", headers=organizer)
    assert published.status_code == 200
    async with socket_to(a) as ws:
        assert (await subscribe(ws, event_id))[-1]["type"] == "subscribed"


async def test_stats_are_for_admins_and_list_every_live_instance(
    a, b, c, http, module_settings, database_url
):
    assert (await http.get("/realtime/stats")).status_code == 401
    attendee = await buyer(http)
    assert (await http.get("/realtime/stats", headers=attendee)).status_code == 403
    admin = await admin_signed_in(
        http, database_url, module_settings, f"admin-{uuid.uuid4().hex[:8]}@example.com"
    )
    async with socket_to(b, token_of(attendee)), socket_to(b):
        async with httpx.AsyncClient(base_url=b.url) as client:
            response = await client.get("/realtime/stats", headers=admin)
            metrics = (await client.get("/metrics")).text
    assert response.status_code == 200, response.text
    body = response.json()
    by_pid = {i["pid"]: i for i in body["instances"]}
    assert {a.process.pid, b.process.pid, c.process.pid} <= set(by_pid)
    mine = by_pid[b.process.pid]  # the answering instance counts live
    assert mine["connections"] >= 2 and mine["authenticated"] >= 1 and mine["anonymous"] >= 1
    assert mine["messages_sent"] >= 2 and mine["uptime_seconds"] > 0
    assert "realtime" in mine["roles"]
    assert body["connections"] == sum(i["connections"] for i in body["instances"])
    assert 'bilten_ws_connections{kind="authenticated"}' in metrics
    assert "bilten_ws_messages_sent_total" in metrics


async def test_redis_subscriptions_follow_local_listeners(b, http, module_settings):
    import redis.asyncio as aioredis

    from bilten import keys

    event_id, _, _, _ = await published_event(http)
    auth, user_id = await register(http, f"sub-{uuid.uuid4().hex[:8]}@example.com")
    client = aioredis.Redis.from_url(module_settings.redis_url)

    async def subscribed(channel: str) -> bool:
        [(_, listeners)] = await client.pubsub_numsub(channel)
        return listeners > 0

    async def eventually(channel: str, wanted: bool) -> None:
        async with asyncio.timeout(3):
            while await subscribed(channel) != wanted:
                await asyncio.sleep(0.05)

    try:
        room, mailbox = keys.seats_channel(event_id), keys.user_channel(user_id)
        assert not await subscribed(room) and not await subscribed(mailbox)
        async with socket_to(b, token_of(auth)) as ws:
            await eventually(mailbox, True)
            await subscribe(ws, event_id)
            assert await subscribed(room)
        await eventually(mailbox, False)  # the user's last socket here closed
        missing = str(uuid.uuid4())
        async with socket_to(b) as ws:
            assert (await subscribe(ws, missing))[-1]["code"] == "not_found"
        await eventually(keys.seats_channel(missing), False)
    finally:
        await client.aclose()


async def test_the_websocket_is_documented(a, http):
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert "get" in paths["/ws"] and "get" in paths["/realtime/stats"]


def test_history_keeps_versions_in_order_and_drops_redeliveries():
    history = History(limit=3)
    assert history.floor is None and not history.reaches(0)
    history.anchor(10)
    for version in (12, 11, 13):
        assert history.add(version, frame(f"d{version}"))
    assert not history.add(12, frame("d12"))  # redelivered
    assert [f.event["text"] for f in history.after(10)] == ["d11", "d12", "d13"]
    assert history.reaches(10) and history.latest == 13
    assert history.add(14, frame("d14"))  # the oldest goes; the history now starts after 11
    assert history.floor == 11 and not history.reaches(10) and history.reaches(11)
    assert [f.event["text"] for f in history.after(11)] == ["d12", "d13", "d14"]


def test_history_gives_late_deltas_to_whoever_missed_them():
    history = History(limit=10)
    history.anchor(0)
    history.add(5, frame("d5"))
    mark = history.clock  # a snapshot read now
    history.add(7, frame("d7"))
    history.add(6, frame("d6"))  # committed after 7, arrived after it
    # A client that had 7 missed 6; one with the snapshot at 5 missed both.
    assert [f.event["text"] for f in history.after(7)] == ["d6"]
    assert [f.event["text"] for f in history.after(5, mark)] == ["d6", "d7"]
    history.forget()
    assert not history.reaches(7) and history.after(0) == []


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_frames_are_the_bytes_a_websocket_server_would_send(size):
    from websockets.frames import Frame as WsFrame
    from websockets.frames import Opcode

    text = "é" * (size // 2) + "x" * (size % 2)
    expected = WsFrame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    assert frame(text).wire == expected
    assert frame(text).event == {"type": "websocket.send", "text": text}


async def test_a_connection_through_plain_asgi_queues_then_closes_when_full():
    from bilten.realtime.connection import Connection, Counters

    sent: list[dict] = []
    gate = asyncio.Event()

    async def send(message):  # an ASGI server whose socket takes nothing until the gate opens
        await gate.wait()
        sent.append(message)

    detached = []
    counters = Counters()
    connection = Connection({}, send, counters, 2, detached.append)
    assert connection.protocol is None  # not uvicorn's: every message goes through ASGI
    frames = [frame(f"m{n}") for n in range(4)]
    assert connection.offer(frames[0])  # started, waiting for the socket
    assert connection.offer(frames[1]) and connection.offer(frames[2])  # queued
    assert not connection.offer(frames[3])  # the queue is full: closed, 1013
    assert connection.close_code == 1013 and detached == [connection]
    assert counters.closed_slow == 1
    gate.set()
    await asyncio.wait_for(connection.writer, 1)
    assert sent[0] == frames[0].event
    assert sent[1]["type"] == "websocket.close" and sent[1]["code"] == 1013
    assert len(sent) == 2 and counters.sent == 1
    assert not connection.offer(frames[0])


async def test_a_connection_through_plain_asgi_sends_in_order():
    from bilten.realtime.connection import Connection, Counters

    sent: list[str] = []

    async def send(message):
        await asyncio.sleep(0)  # every send waits a little
        sent.append(message["text"])

    connection = Connection({}, send, Counters(), 100, lambda c: None)
    for n in range(10):
        assert connection.offer(frame(str(n)))
    await asyncio.wait_for(connection.writer, 1)
    assert sent == [str(n) for n in range(10)] and connection.writer is None


async def test_signing_out_ends_the_session_at_once_on_every_instance(a, b, http):
    """Logout on instance A: the socket on instance B closes with 4401, and the access token
    is refused everywhere, before it would expire."""
    email = f"out-{uuid.uuid4().hex[:8]}@example.com"
    body = (
        await http.post(
            "/auth/register", json={"email": email, "password": "a long password", "name": "O"}
        )
    ).json()
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    async with httpx.AsyncClient(base_url=b.url, timeout=15) as on_b:
        assert (await on_b.get("/auth/me", headers=bearer)).status_code == 200
        async with socket_to(b, body["access_token"]) as ws:
            out = await http.post("/auth/logout", json={"refresh_token": body["refresh_token"]})
            assert out.status_code == 204
            with pytest.raises(websockets.ConnectionClosed):
                await receive(ws)
            assert ws.close_code == 4401
        refused = await on_b.get("/auth/me", headers=bearer)
        assert refused.status_code == 401
    assert (await http.get("/auth/me", headers=bearer)).status_code == 401


async def test_a_socket_closes_when_its_token_expires(a, module_settings):
    from bilten import tokens

    signer = tokens.signer(module_settings)
    soon = signer.issue(
        str(uuid.uuid4()), "attendee", "s-expiring", now=time.time() - signer.ttl + 2
    )
    async with socket_to(a, soon) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await receive(ws, timeout=6)
        assert ws.close_code == 4401


async def test_a_flood_of_messages_closes_the_connection_with_4429(a):
    async with socket_to(a) as ws:
        for _ in range(100):  # the default allows 20 a second, in bursts of 40
            await ws.send(json.dumps({"type": "ping"}))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await receive(ws)
        assert ws.close_code == 4429


async def test_connections_per_address_and_origins_are_bounded(spawn_server):
    server = spawn_server(
        BILTEN_WS_MAX_PER_IP="3", BILTEN_WS_ORIGINS="https://tickets.example.com", **FAST
    )
    allowed = {"Origin": "https://tickets.example.com"}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(socket_to(server, additional_headers=allowed))
        async with connect(ws_url(server), proxy=None, additional_headers=allowed) as fourth:
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await receive(fourth)
            assert fourth.close_code == 4429
    async with socket_to(server, additional_headers=allowed):  # the others closed: room again
        pass
    for origin in ({"Origin": "https://evil.example"}, {}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(ws_url(server), proxy=None, additional_headers=origin):
                pass
        assert refused.value.response.status_code == 403


async def test_a_burst_goes_to_each_socket_in_one_write():
    from bilten.realtime.connection import Connection, Counters
    from bilten.realtime.protocol import Flag

    class Transport:
        def __init__(self):
            self.writes: list[bytes] = []

        def write(self, data):
            self.writes.append(data)

        def is_closing(self):
            return False

    class Protocol:  # what the hub reads of uvicorn's protocol
        def __init__(self):
            self.transport = Transport()
            self.writable = Flag()
            self.close_sent = False

    async def never(message):
        raise AssertionError("nothing goes through ASGI while the socket takes the bytes")

    counters = Counters()
    connection = Connection({}, never, counters, 8, lambda c: None)
    connection.protocol = protocol = Protocol()
    frames = [frame(f"m{n}") for n in range(3)]
    joined = b"".join(f.wire for f in frames)
    assert connection.offer_all(frames, joined)
    assert protocol.transport.writes == [joined] and counters.sent == 3

    # A socket that must drain first: the frames wait in order behind the one in flight.
    protocol.writable.clear()
    sent: list[dict] = []
    gate = asyncio.Event()

    async def slow(message):
        await gate.wait()
        sent.append(message)

    connection.send = slow
    assert connection.offer_all(frames, joined)
    assert len(protocol.transport.writes) == 1 and len(connection.pending) == 2
    gate.set()
    await asyncio.wait_for(connection.writer, 1)
    assert sent == [f.event for f in frames] and counters.sent == 6


async def test_a_room_delivers_in_steps_and_a_change_during_a_pass_rides_along(monkeypatch):
    from bilten.realtime import rooms

    monkeypatch.setattr(rooms, "PASS_STEP", 0.0)  # one socket written a step
    monkeypatch.setattr(rooms.random, "randrange", lambda n: 0)  # passes from the first

    class Member:  # what a room calls on a connection
        def __init__(self, room):
            self.room = room
            self.writes: list[list[str]] = []

        def offer(self, f):
            self.writes.append([f.event["text"]])
            return True

        def offer_all(self, frames, joined):
            assert joined == b"".join(f.wire for f in frames)
            self.writes.append([f.event["text"] for f in frames])
            return True

    room = rooms.Room(str(uuid.uuid4()), 8)
    members = [Member(room) for _ in range(5)]
    for member in members:
        room.join(member)
    room.broadcast(frame("1"))
    assert not any(m.writes for m in members)  # nothing is written by the broadcast itself
    await asyncio.sleep(0)  # one step, then the loop serves others
    await asyncio.sleep(0)
    assert [len(m.writes) for m in members] == [1, 1, 0, 0, 0]

    # A change during the pass: the sockets not yet visited get both in one write, the
    # others get it in a second pass; a newcomer only what follows its snapshot; a member
    # that leaves gets nothing more.
    room.broadcast(frame("2"))
    room.leave(members[4])
    newcomer = Member(room)
    room.join(newcomer)
    for _ in range(8):
        await asyncio.sleep(0)
    assert [m.writes for m in members] == [
        [["1"], ["2"]],
        [["1"], ["2"]],
        [["1", "2"]],
        [["1", "2"]],
        [],
    ]
    assert newcomer.writes == [] and room.by_id.sending is None and room.by_id.pending == []
    room.broadcast(frame("3"))
    for _ in range(8):
        await asyncio.sleep(0)
    assert newcomer.writes == [["3"]] and members[0].writes[-1] == ["3"]
    assert room.by_id.pending == [] and room.by_id.sending is None


async def test_each_pass_of_a_room_starts_at_a_member_drawn_at_random():
    """No socket is always the last one a pass reaches."""
    from bilten.realtime import rooms

    writes: list[int] = []

    class Member:
        def __init__(self, n):
            self.n = n

        def offer(self, f):
            writes.append(self.n)
            return True

    room = rooms.Room(str(uuid.uuid4()), 8)
    for n in range(5):
        room.join(Member(n))
    for n in range(100):  # one frame a pass: each pass writes each member once
        room.broadcast(frame(str(n)))
        while room.by_id.sending is not None:
            await asyncio.sleep(0)
    passes = [writes[n : n + 5] for n in range(0, len(writes), 5)]
    assert len(passes) == 100 and all(sorted(p) == [0, 1, 2, 3, 4] for p in passes)
    assert {p[-1] for p in passes} == {0, 1, 2, 3, 4}  # the last one drawn anew (p ~ 1e-9)


async def test_the_lean_protocols_inbox_and_flag():
    from bilten.realtime.protocol import Flag, Inbox

    inbox = Inbox()
    assert inbox.empty()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait({"n": 1})
    inbox.put_nowait({"n": 2})
    assert await reader == {"n": 1} and not inbox.empty()
    assert await inbox.get() == {"n": 2} and inbox.empty()
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    inbox.put_nowait({"n": 3})
    assert await inbox.get() == {"n": 3}

    flag = Flag()
    assert flag.is_set() and await flag.wait()
    flag.clear()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.gather(*waiters) == [True, True] and flag.waiters is None


async def test_an_open_socket_keeps_nothing_of_its_handshake(a, http):
    """Once open, the protocol lets go of the request's headers and path (the access token in
    ``?token=`` with them), and the servers, which run it, still serve a signed-in socket."""
    from bilten.realtime.protocol import LeanWebSocketProtocol

    class Request:
        def __init__(self):
            from websockets.datastructures import Headers

            self.path = "/ws?token=secret"
            self.headers = Headers({"Authorization": "Bearer secret"})

    protocol = LeanWebSocketProtocol.__new__(LeanWebSocketProtocol)
    protocol.request = request = Request()
    protocol.response = None
    protocol.forget_handshake()
    assert protocol.request is None and request.path == "" and not list(request.headers)

    auth = await buyer(http)
    async with socket_to(a, token_of(auth)) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}


async def test_opening_rooms_counts_against_the_per_ip_api_budget(module_settings):
    """A subscription that opens a room (a Redis subscription and a database read) costs one
    hit of the client's per-IP budget, as a request would; joining an open room costs none."""
    import uuid as uuid_

    from asgi_lifespan import LifespanManager

    from bilten.app import create_app
    from bilten.settings import Rate

    own = module_settings.replace(
        limit_api_ip=Rate(3, 60), roles=frozenset({"api", "realtime"}), instance_id="budgeted"
    )
    inbox: asyncio.Queue = asyncio.Queue()
    frames: list[dict] = []

    async def send(message: dict) -> None:
        if message["type"] == "websocket.send":
            frames.append(json.loads(message["text"]))

    scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [],
        "client": (f"10.{uuid_.uuid4().int % 250}.0.9", 5000),
        "server": ("bilten.test", 80),
        "scheme": "ws",
        "root_path": "",
        "subprotocols": [],
    }
    made_up = [str(uuid_.uuid4()) for _ in range(4)]
    async with LifespanManager(create_app(own)) as manager:
        socket_task = asyncio.create_task(manager.app(scope, inbox.get, send))
        await inbox.put({"type": "websocket.connect"})
        # Three rooms open (unknown events: not_found), the fourth is over the budget; the
        # first again joins the room still open for it, at no cost.
        for event_id in [*made_up, made_up[0]]:
            subscribe = {"type": "subscribe", "room": f"event:{event_id}"}
            await inbox.put({"type": "websocket.receive", "text": json.dumps(subscribe)})
        async with asyncio.timeout(5):
            while len([f for f in frames if f["type"] == "error"]) < 5:
                await asyncio.sleep(0.01)
        await inbox.put({"type": "websocket.disconnect", "code": 1000})
        await socket_task
    errors = [(f["code"], f["room"]) for f in frames if f["type"] == "error"]
    assert errors == [
        ("not_found", f"event:{made_up[0]}"),
        ("not_found", f"event:{made_up[1]}"),
        ("not_found", f"event:{made_up[2]}"),
        ("rate_limited", f"event:{made_up[3]}"),
        ("not_found", f"event:{made_up[0]}"),
    ]
