"""Hostile booking requests: each fails alone, at the door where it can, and none stalls a sale."""

import asyncio
import time
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from bilten import keys, queue
from tests.test_bookings import book, buyer, published_event, queued
from tests.test_catalog import running

TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]),  # NUL, controls, emoji, RTL...
    max_size=300,
)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
    st.lists(TEXT),
)


def hostile_bodies(event_id, seats, standing, other_event, other_seats):
    """Booking bodies a careless or malicious client sends: some valid, most not."""
    ids = st.one_of(
        st.sampled_from(seats),
        st.sampled_from(other_seats),
        st.uuids().map(str),
        TEXT,
    )
    seat_ids = st.one_of(
        st.lists(ids, max_size=3),
        st.lists(st.sampled_from(seats), min_size=1, max_size=3).map(lambda s: s + s[:1]),
        st.lists(st.sampled_from(seats), min_size=11, max_size=30, unique=True),
        st.lists(st.uuids().map(str), min_size=101, max_size=120),
        JUNK,
    )
    token = st.one_of(
        st.sampled_from(["tok_visa", "tok_chargeDeclined", "tok_processingError"]),
        TEXT,
        st.text(min_size=150, max_size=5000),
        st.just("tok_\x00visa"),
    )
    known = st.fixed_dictionaries(
        {
            "event_id": st.one_of(
                st.just(event_id), st.just(other_event), st.uuids().map(str), JUNK
            ),
            "payment": st.one_of(
                st.fixed_dictionaries({"method": st.just("card"), "token": token}),
                st.fixed_dictionaries({"method": TEXT, "token": token}),
                JUNK,
            ),
        },
        optional={
            "seat_ids": seat_ids,
            "ticket_type_id": st.one_of(st.just(standing), st.uuids().map(str), JUNK),
            "quantity": st.one_of(st.integers(-5, 200), st.integers(), JUNK),
            "hold_id": st.one_of(st.uuids().map(str), JUNK),
        },
    )
    # Well-formed, so that they pass the door and reach the workers: other events' seats,
    # seats that do not exist, odd tokens.
    plausible = st.fixed_dictionaries(
        {
            "event_id": st.just(event_id),
            "seat_ids": st.lists(ids.filter(_is_uuid), min_size=1, max_size=4, unique=True),
            "payment": st.fixed_dictionaries(
                {"method": st.just("card"), "token": token.filter(lambda t: 0 < len(t) <= 200)}
            ),
        }
    )
    unknown = st.dictionaries(TEXT, JUNK, max_size=2)
    return st.one_of(plausible, known, st.builds(lambda a, b: {**b, **a}, known, unknown))


def _is_uuid(value):
    try:
        uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return False
    return True


def examples(strategy, n):
    """``n`` values drawn by hypothesis (its generation, without running a test per value)."""
    drawn = []

    @hypothesis_settings(
        max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(strategy)
    def collect(value):
        drawn.append(value)

    collect()
    return drawn


async def timed_booking(c, event_id, seat):
    auth = await buyer(c)
    began = time.monotonic()
    response = await book(c, auth, {"event_id": event_id, "seat_ids": [seat]})
    assert response.status_code == 201, response.text
    return time.monotonic() - began


async def test_hostile_bodies_never_5xx_and_never_stall_the_sale(settings):
    async with running(settings) as (_, c):
        event_id, seats, standing, _ = await published_event(c, rows=10, per_row=20, capacity=100)
        other_event, other_seats, _, _ = await published_event(c)
        baseline = await timed_booking(c, event_id, seats[-1])
        bodies = examples(
            hostile_bodies(event_id, seats[:-2], standing, other_event, other_seats), 150
        )
        attackers = [await buyer(c) for _ in range(5)]

        async def send(n, body):
            response = await c.post(
                "/bookings",
                json=body,
                headers={**attackers[n % 5], "Idempotency-Key": uuid.uuid4().hex},
            )
            assert response.status_code < 500, (body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"code", "message", "details"}, response.text
            return response.status_code

        statuses = await asyncio.gather(*(send(n, body) for n, body in enumerate(bodies)))
        assert 202 in statuses and 422 in statuses  # some got through the door, most did not
        after = await timed_booking(c, event_id, seats[-2])
        print(f"normal booking: {baseline:.3f} s before, {after:.3f} s after the hostile ones")
        assert after < baseline + 1.0


async def poisoned(c, auth, event_id, seat):
    """A request for ``seat`` the database will refuse (NUL in its token), as an older door
    might have queued it."""
    return queue.Request(
        id=queue.new_request_id(event_id),
        user_id=(await c.get("/auth/me", headers=auth)).json()["id"],
        event_id=event_id,
        key="poison",
        digest="x",
        request={"seat_ids": [seat], "ticket_type_id": None, "quantity": 1},
        provider="test",
        token="tok_\x00visa",
    )


async def test_a_request_that_breaks_its_batch_fails_alone(settings):
    """A request the database refuses (written to the queue by an older door that let NUL
    through, say): its batch is split until it is alone; it fails `internal`, its neighbours
    go on, and the queue is not stopped."""
    from bilten.sagas import batch

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, _, _ = await published_event(c)
        ann, bob, cay = [await buyer(c) for _ in range(3)]
        first = await book(c, ann, {"event_id": event_id, "seat_ids": seats[:1]}, headers={})
        poison = await poisoned(c, bob, event_id, seats[1])
        assert not isinstance(await queue.submit(instance.state.pipeline, poison, 100), queue.Known)
        third = await book(c, cay, {"event_id": event_id, "seat_ids": seats[2:3]}, headers={})
        entries = await queued(instance.state, event_id)
        assert len(entries) == 3
        outcomes = await batch.run_batch(instance.state, entries)
        assert [o.state for o in outcomes] == ["CONFIRMED", "FAILED", "CONFIRMED"]
        assert outcomes[1].error.code == "internal"
        assert [o.booking_id for o in outcomes] == [
            first.json()["request_id"],
            poison.id,
            third.json()["request_id"],
        ]


async def test_a_poisoned_queue_keeps_selling(settings):
    """The same, end to end with the workers running: a later buyer is served at once."""
    async with running(settings) as (instance, c):
        event_id, seats, _, _ = await published_event(c)
        bob = await buyer(c)
        poison = await poisoned(c, bob, event_id, seats[0])
        await queue.submit(instance.state.pipeline, poison, 100)
        after = await timed_booking(c, event_id, seats[1])
        assert after < 3.0
        status = await c.get(f"/bookings/requests/{poison.id}", headers=bob)
        assert status.status_code == 200, status.text
        assert status.json()["status"] == "failed"
        assert status.json()["error"]["code"] == "internal"
        # Its seat was given back at the door.
        assert not await instance.state.redis.hexists(keys.seat_claims(event_id), seats[0])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"payment": {"method": "card", "token": "tok_\x00"}}, "payment.token"),
        ({"payment": {"method": "card", "token": "tok_visa"}, "quantity": 2}, None),
    ],
)
async def test_nul_is_refused_at_the_door_naming_its_field(client, body, field):
    auth = await buyer(client)
    event_id, _, standing, _ = await published_event(client)
    if field is None:  # the same body without NUL passes the door
        body = {**body, "ticket_type_id": standing}
    response = await client.post(
        "/bookings",
        json={"event_id": event_id, **body},
        headers={**auth, "Idempotency-Key": "k"},
    )
    if field is None:
        assert response.status_code == 202, response.text
        return
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["field"] == field


async def test_nul_in_a_query_is_a_422(client):
    response = await client.get("/events", params={"q": "a\x00b"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["field"] == "q"


async def test_over_the_order_limit_is_refused_at_the_door_taking_nothing(client, redis):
    auth = await buyer(client)
    event_id, seats, standing, _ = await published_event(client, max_per_order=4)
    response = await book(client, auth, {"event_id": event_id, "seat_ids": seats[:5]}, headers={})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["field"] == "seat_ids"
    units = await book(
        client, auth, {"event_id": event_id, "ticket_type_id": standing, "quantity": 5}, headers={}
    )
    assert units.status_code == 422, units.text
    assert await redis.hlen(keys.seat_claims(event_id)) == 0
    assert await redis.xlen(keys.queue(event_id)) == 0


async def test_seats_of_another_event_are_refused_at_the_door_taking_nothing(client, redis):
    auth = await buyer(client)
    event_id, seats, _, _ = await published_event(client)
    _, other_seats, _, _ = await published_event(client)
    mixed = [seats[0], other_seats[0], str(uuid.uuid4())]
    response = await book(client, auth, {"event_id": event_id, "seat_ids": mixed}, headers={})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["seat_ids"] == mixed[1:]
    assert await redis.hlen(keys.seat_claims(event_id)) == 0
    assert await redis.xlen(keys.queue(event_id)) == 0
    ours = await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]}, headers={})
    assert ours.status_code == 202, ours.text


async def test_a_type_or_hold_of_another_event_is_refused_at_the_door_taking_nothing(client, redis):
    auth = await buyer(client)
    event_id, seats, _, _ = await published_event(client)
    other_id, other_seats, other_type, _ = await published_event(client)
    await client.get(f"/events/{event_id}")  # the event's details in the door's cache
    for type_id in (other_type, str(uuid.uuid4())):
        body = {"event_id": event_id, "ticket_type_id": type_id, "quantity": 1}
        response = await book(client, auth, body, headers={})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["details"]["fields"][0]["field"] == "ticket_type_id"
    held = await client.post(
        "/holds", headers=auth, json={"event_id": other_id, "seat_ids": other_seats[:1]}
    )
    assert held.status_code == 201, held.text
    someone = await buyer(client)
    mine = await client.post(
        "/holds", headers=someone, json={"event_id": event_id, "seat_ids": seats[:1]}
    )
    for hold_id in (held.json()["id"], str(uuid.uuid4()), mine.json()["id"]):
        response = await book(client, auth, {"event_id": event_id, "hold_id": hold_id}, headers={})
        assert response.status_code == 404, response.text
    assert await redis.xlen(keys.queue(event_id)) == 0
    ours = await book(client, someone, {"event_id": event_id, "hold_id": mine.json()["id"]})
    assert ours.status_code == 201, ours.text


async def test_a_request_status_without_its_owner_in_redis_stays_private(settings):
    """Its Redis status rewritten without its owner (expiry, a recovery announcement): the
    record decides who may read it, and nothing answers 500."""
    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, _, _ = await published_event(c)
        ann, bob = await buyer(c), await buyer(c)
        answer = await book(c, ann, {"event_id": event_id, "seat_ids": seats[:1]}, headers={})
        request_id = answer.json()["request_id"]
        await instance.state.redis.hdel(keys.booking_request(request_id), "user_id", "event_id")
        assert (await c.get(f"/bookings/requests/{request_id}", headers=bob)).status_code == 404
        mine = await c.get(f"/bookings/requests/{request_id}", headers=ann)
        assert mine.status_code == 200, mine.text
        assert mine.json()["status"] == "queued"
        await instance.state.redis.delete(keys.booking_request(request_id))
        assert (await c.get(f"/bookings/requests/{request_id}", headers=bob)).status_code == 404
        gone = await c.get(f"/bookings/requests/{request_id}", headers=ann)
        assert gone.status_code == 200 and gone.json()["status"] == "queued"  # on record


async def test_numbers_past_the_databases_integers_are_a_422(client):
    """Found by schemathesis: a price past PostgreSQL's integer was a 500."""
    for query in ({"max_price": 23524998023286}, {"min_price": 2**31}, {"city": "x" * 201}):
        response = await client.get("/events", params=query)
        assert response.status_code == 422, (query, response.text)


async def test_times_with_no_utc_equivalent_are_a_422(client):
    """Found in review: ``0001-01-01T00:00:00+14:00`` decodes, then overflows when PostgreSQL's
    driver turns it into UTC (a 500), in bodies, queries and forged cursors alike."""
    import base64
    import json

    from tests.test_bookings import draft_event

    early, late = "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"
    for params, field in (({"from": early}, "from"), ({"to": late}, "to")):
        response = await client.get("/events", params=params)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["details"]["fields"][0]["field"] == field
    event, organizer = await draft_event(client)
    patch = await client.patch(
        f"/events/{event['id']}", headers=organizer, json={"sale_starts_at": early}
    )
    assert patch.status_code == 422, patch.text
    assert patch.json()["error"]["details"]["fields"][0]["field"] == "sale_starts_at"
    forged = json.dumps([early, str(uuid.uuid4())]).encode()
    cursor = base64.urlsafe_b64encode(forged).decode().rstrip("=")
    for path in ("/events", "/bookings", "/tickets"):
        response = await client.get(path, params={"cursor": cursor}, headers=organizer)
        assert response.status_code == 422, (path, response.text)
    assert (await client.get(f"/events/{event['id']}", headers=organizer)).json()[
        "sale_starts_at"
    ] == event["sale_starts_at"]
