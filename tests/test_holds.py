"""Holds made in batches (bilten.holddesk): each hold all or nothing on its own, in arrival
order, whatever else its batch holds; concurrent clients never share a seat."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bilten import cache, db, holds
from bilten.errors import ApiError
from bilten.holddesk import HoldDesk
from tests.catalog_helpers import register
from tests.test_bookings import buyer, published_event


async def user_id(client) -> str:
    _, uid = await register(client, f"h-{uuid.uuid4().hex[:10]}@x.com")
    return uid


async def test_one_batch_serves_each_request_alone_in_arrival_order(client, settings):
    event_id, seats, standing, _ = await published_event(client, capacity=5, max_per_order=4)
    other_event, other_seats, _, _ = await published_event(client)
    ann, bob, cleo = [await user_id(client) for _ in range(3)]
    wants = [
        holds.Want(ann, event_id, seats[0:2], None, 2),  # wins both
        holds.Want(bob, event_id, seats[1:3], None, 2),  # seats[1] is ann's: refused whole
        holds.Want(bob, event_id, seats[2:3], None, 1),  # seats[2] is still free: wins
        holds.Want(cleo, event_id, [other_seats[0]], None, 1),  # not a seat of this event
        holds.Want(cleo, event_id, [], standing, 3),  # three of five units
        holds.Want(bob, event_id, [], standing, 3),  # two left: sold out
        holds.Want(ann, event_id, seats[5:8], None, 3),  # ann would have 5 > 4: person limit
        holds.Want(cleo, event_id, seats[10:15], None, 5),  # over the order limit
        holds.Want(cleo, str(uuid.uuid4()), seats[20:21], None, 1),  # no such event
        holds.Want(cleo, other_event, [other_seats[0]], None, 1),  # another event, same batch
        holds.Want(cleo, event_id, [], str(uuid.uuid4()), 1),  # no such ticket type
    ]
    conn = await db.connect(settings.database_url)
    try:
        async with conn.transaction():
            results = await holds.create_many(conn, wants, 600)
        codes = [r.code if isinstance(r, ApiError) else "held" for r in results]
        assert codes == [
            "held",
            "seat_unavailable",
            "held",
            "validation_error",
            "held",
            "sold_out",
            "conflict",
            "validation_error",
            "not_found",
            "held",
            "validation_error",
        ]
        assert results[1].details["seat_ids"] == [seats[1]]
        assert results[5].details["remaining"] == 2
        held = await conn.fetch(
            "SELECT seat_id::text, hold_id::text FROM event_seats WHERE status = 'held'"
        )
        by_hold = {r.id: r for r in results if isinstance(r, holds.Hold)}
        assert {r["seat_id"] for r in held} == {seats[0], seats[1], seats[2], other_seats[0]}
        for row in held:
            assert row["seat_id"] in by_hold[row["hold_id"]].seat_ids
        units = await conn.fetchval("SELECT held FROM ticket_types WHERE id = $1", standing)
        assert units == 3
        assert results[0].amount_cents > 0 and results[4].quantity == 3
        rows = await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'active'")
        assert rows == 4
    finally:
        await conn.close()


async def test_a_batch_that_fails_is_tried_request_by_request(client, settings, redis):
    """A request the door would never let through (a seat id that is not a UUID) breaks its
    batch's statements: it fails alone, the others of its batch are held."""
    event_id, seats, _, _ = await published_event(client)
    ann, bob = await user_id(client), await user_id(client)
    pool = await db.create_pool(settings)
    desk = HoldDesk(pool, redis, cache.Caches(), 600)
    try:
        results = await asyncio.gather(
            desk.hold(holds.Want(ann, event_id, seats[:1], None, 1)),
            desk.hold(holds.Want(bob, event_id, ["not-a-uuid"], None, 1)),
            desk.hold(holds.Want(bob, event_id, seats[1:2], None, 1)),
            return_exceptions=True,
        )
    finally:
        await pool.close()
    assert isinstance(results[0], holds.Hold) and isinstance(results[2], holds.Hold)
    assert isinstance(results[1], Exception) and not isinstance(results[1], ApiError)


async def test_concurrent_clients_never_share_a_seat(client):
    event_id, seats, _, _ = await published_event(client, rows=2, per_row=10)
    buyers = [await buyer(client) for _ in range(20)]

    async def grab(auth, n):
        # overlapping pairs: buyer n wants seats n % 20 and (n + 1) % 20
        wanted = [seats[n % 20], seats[(n + 1) % 20]]
        return await client.post(
            "/holds", headers=auth, json={"event_id": event_id, "seat_ids": wanted}
        )

    answers = await asyncio.gather(*(grab(a, n) for n, a in enumerate(buyers)))
    won = [a.json() for a in answers if a.status_code == 201]
    assert all(a.status_code in (201, 409) for a in answers)
    taken = Counter(s for h in won for s in h["seat_ids"])
    assert all(n == 1 for n in taken.values())
    # Served greedily in arrival order: the winners' pairs are a maximal set of disjoint pairs
    # of the ring of 20 seats, so at least 7 of them and at most 10.
    assert 7 <= len(won) <= 10
    statuses = (await client.get(f"/events/{event_id}/seats")).json()["seats"]
    held = {s["id"] for s in statuses if s["status"] == "held"}
    assert held == set(taken)


@hsettings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    picks=st.lists(
        st.lists(st.integers(0, 11), min_size=1, max_size=3, unique=True), min_size=1, max_size=12
    )
)
async def test_any_mix_of_wants_holds_each_seat_once(client, settings, picks):
    event_id, seats, _, _ = await published_event(client, rows=2, per_row=6)
    uid = await user_id(client)
    wants = [holds.Want(uid, event_id, [seats[i] for i in p], None, len(p)) for p in picks]
    conn = await db.connect(settings.database_url)
    try:
        async with conn.transaction():
            results = await holds.create_many(conn, wants, 600)
        seen: set[str] = set()
        for want, result in zip(wants, results, strict=True):
            if isinstance(result, holds.Hold):
                assert not seen & set(want.seat_ids)
                seen |= set(want.seat_ids)
            else:
                assert result.code in ("seat_unavailable", "conflict")
        held = {
            r["seat_id"]
            for r in await conn.fetch(
                "SELECT seat_id::text FROM event_seats WHERE event_id = $1 AND status = 'held'",
                event_id,
            )
        }
        assert held == seen
    finally:
        await conn.close()


async def test_a_taken_seat_is_refused_without_waiting_for_its_lock(client, settings):
    """While a transaction holds a taken seat's row lock (a booking being written, say), a
    click on that seat is refused at once from the committed rows; a click on a free seat
    whose row is locked still waits for the lock, then wins."""
    event_id, seats, _, organizer = await published_event(client)
    ann, bob = await buyer(client), await buyer(client)
    first = await client.post(
        "/holds", headers=ann, json={"event_id": event_id, "seat_ids": seats[:1]}
    )
    assert first.status_code == 201
    conn = await db.connect(settings.database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT 1 FROM event_seats WHERE event_id = $1 AND seat_id = ANY ($2::uuid[])"
                " FOR UPDATE",
                event_id,
                seats[:2],
            )
            taken = await asyncio.wait_for(
                client.post(
                    "/holds", headers=bob, json={"event_id": event_id, "seat_ids": seats[:2]}
                ),
                timeout=5,
            )
            assert taken.status_code == 409
            assert taken.json()["error"]["details"]["seat_ids"] == [seats[0]]
            free = asyncio.ensure_future(
                client.post(
                    "/holds", headers=bob, json={"event_id": event_id, "seat_ids": seats[1:2]}
                )
            )
            await asyncio.sleep(0.3)
            assert not free.done()  # the locking path decides a seat that looked free
        assert (await free).status_code == 201
    finally:
        await conn.close()
    # An event's own refusal keeps its precedence over a taken seat.
    cancel = await client.post(f"/events/{event_id}/cancel", headers=organizer)
    assert cancel.status_code == 200, cancel.text
    late = await client.post(
        "/holds", headers=bob, json={"event_id": event_id, "seat_ids": seats[:1]}
    )
    assert late.status_code == 409 and late.json()["error"]["code"] == "conflict"


async def test_a_refused_click_keeps_its_answer_when_the_rest_of_its_batch_fails(
    client, settings, redis
):
    """A click on a taken seat, refused before the batch's transaction, is answered 409 even
    when the one other request of its batch breaks that transaction."""
    event_id, seats, _, _ = await published_event(client)
    ann, bob = await user_id(client), await user_id(client)
    pool = await db.create_pool(settings)
    desk = HoldDesk(pool, redis, cache.Caches(), 600)
    try:
        assert isinstance(
            await desk.hold(holds.Want(ann, event_id, seats[:1], None, 1)), holds.Hold
        )
        results = await asyncio.gather(
            desk.hold(holds.Want(bob, event_id, seats[:1], None, 1)),  # taken
            desk.hold(holds.Want(bob, event_id, [], "not-a-uuid", 1)),  # breaks its statements
            return_exceptions=True,
        )
    finally:
        await pool.close()
    assert isinstance(results[0], ApiError) and results[0].code == "seat_unavailable"
    assert isinstance(results[1], Exception) and not isinstance(results[1], ApiError)
