"""The booking engine over HTTP: holds, the queue, the saga, payments, idempotency, cancel."""

import asyncio
import random
import uuid

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bilten import db, queue
from bilten.app import create_app
from tests.catalog_helpers import START, iso, register
from tests.conftest import truncate

WAIT = {"Prefer": "wait=10"}


@pytest.fixture(autouse=True)
async def clean(database_url, redis):
    await truncate(database_url, "users", "outbox")


async def draft_event(client, rows=3, per_row=10, capacity=20, max_per_order=10, title="Show"):
    """An organizer's event, not yet published: its JSON and the organizer's headers."""
    organizer, _ = await register(client, f"org-{uuid.uuid4().hex[:8]}@example.com", "organizer")
    venue = await client.post(
        "/venues",
        headers=organizer,
        json={
            "name": "Hall",
            "address": "1 St",
            "city": "Oslo",
            "country": "NO",
            "timezone": "Europe/Oslo",
            "sections": [
                {
                    "name": "Main",
                    "rows": [{"label": chr(65 + r), "seats": per_row} for r in range(rows)],
                }
            ],
        },
    )
    assert venue.status_code == 201, venue.text
    event = await client.post(
        "/events",
        headers=organizer,
        json={
            "title": title,
            "category": "concert",
            "venue_id": venue.json()["id"],
            "starts_at": iso(START),
            "ends_at": iso(START.replace(hour=23)),
            "currency": "EUR",
            "max_tickets_per_order": max_per_order,
            "price_tiers": [{"name": "Main", "price_cents": 4500, "sections": ["Main"]}],
            "ticket_types": [{"name": "Standing", "price_cents": 1500, "capacity": capacity}],
        },
    )
    assert event.status_code == 201, event.text
    return event.json(), organizer


async def published_event(client, rows=3, per_row=10, capacity=20, max_per_order=10):
    event, organizer = await draft_event(client, rows, per_row, capacity, max_per_order)
    event_id = event["id"]
    assert (await client.post(f"/events/{event_id}/publish", headers=organizer)).status_code == 200
    seats = (await client.get(f"/events/{event_id}/seats")).json()["seats"]
    standing = event["ticket_types"][0]["id"]
    return event_id, [s["id"] for s in seats], standing, organizer


async def buyer(client, n=None):
    return (await register(client, f"buyer-{n if n is not None else uuid.uuid4().hex[:10]}@x.com"))[
        0
    ]


def book(client, auth, body, key=None, headers=WAIT):
    return client.post(
        "/bookings",
        json={"payment": {"method": "card", "token": "tok_visa"}, **body},
        headers={**auth, "Idempotency-Key": key or uuid.uuid4().hex, **headers},
    )


async def queued(state, event_id):
    """The event's queued requests, as a worker would take them (for tests without workers)."""
    from bilten import keys, queue

    return queue.parse_entries(await state.redis.xrange(keys.queue(event_id)))


async def seat_statuses(client, event_id):
    seats = (await client.get(f"/events/{event_id}/seats")).json()["seats"]
    return {s["id"]: s["status"] for s in seats}


async def test_hold_then_book_confirms_with_tickets(client):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    hold = await client.post(
        "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
    )
    assert hold.status_code == 201, hold.text
    assert sorted(hold.json()["seat_ids"]) == sorted(seats[:2])
    assert hold.json()["amount_cents"] == 9000
    assert (await seat_statuses(client, event_id))[seats[0]] == "held"
    response = await book(client, auth, {"event_id": event_id, "hold_id": hold.json()["id"]})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "confirmed"
    booking = body["booking"]
    assert booking["status"] == "confirmed"
    assert booking["total_cents"] == 9000 and booking["currency"] == "EUR"
    assert booking["payment"] == {"status": "succeeded", "provider": "test", "amount_cents": 9000}
    assert {i["seat_id"] for i in booking["items"]} == set(seats[:2])
    assert len(booking["tickets"]) == 2 and all(t["code"] for t in booking["tickets"])
    statuses = await seat_statuses(client, event_id)
    assert statuses[seats[0]] == statuses[seats[1]] == "sold"
    again = await client.get(f"/bookings/{booking['id']}", headers=auth)
    assert again.json() == booking


async def test_every_transition_is_kept_in_the_booking_in_order(client, settings):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    done = await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]})
    booking_id = done.json()["booking"]["id"]
    assert (await client.post(f"/bookings/{booking_id}/cancel", headers=auth)).status_code == 200
    conn = await db.connect(settings.database_url)
    try:
        history = await conn.fetchval("SELECT history FROM bookings WHERE id = $1", booking_id)
    finally:
        await conn.close()
    steps = [(s.get("from"), s["to"], s.get("reason")) for s in history]
    assert steps == [
        (None, "PENDING", "requested"),
        ("PENDING", "PAYMENT_PENDING", "seats_reserved"),
        ("PAYMENT_PENDING", "CONFIRMED", None),
        ("CONFIRMED", "CANCELLED", "cancelled"),
    ]
    times = [s["at"] for s in history]
    assert times == sorted(times)


async def test_general_admission_units(client):
    event_id, _, standing, _ = await published_event(client, capacity=5)
    auth = await buyer(client)
    response = await book(
        client, auth, {"event_id": event_id, "ticket_type_id": standing, "quantity": 3}
    )
    assert response.status_code == 201, response.text
    assert response.json()["booking"]["total_cents"] == 4500
    detail = (await client.get(f"/events/{event_id}")).json()
    assert detail["ticket_types"][0]["remaining"] == 2
    too_many = await book(
        client,
        await buyer(client),
        {"event_id": event_id, "ticket_type_id": standing, "quantity": 3},
    )
    assert too_many.status_code == 409
    assert too_many.json()["error"]["code"] == "sold_out"


async def test_declined_card_releases_the_seats(client):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    response = await client.post(
        "/bookings",
        json={
            "event_id": event_id,
            "seat_ids": seats[:2],
            "payment": {"method": "card", "token": "tok_chargeDeclined"},
        },
        headers={**auth, "Idempotency-Key": "k1", **WAIT},
    )
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error["code"] == "payment_declined"
    assert error["details"]["decline_code"]
    statuses = await seat_statuses(client, event_id)
    assert statuses[seats[0]] == statuses[seats[1]] == "available"
    booking = await client.get(f"/bookings/{error['details']['booking_id']}", headers=auth)
    assert booking.json()["status"] == "failed"
    assert booking.json()["payment"]["status"] == "failed"
    assert booking.json()["failure"]["code"] == "payment_declined"


def on_fake_stripe(settings, fake, outage_wait):
    from tests.test_payments import API_KEY

    return settings.replace(
        payment_provider="stripe",
        stripe_api_key=API_KEY,
        stripe_base_url=fake.url,
        payment_timeout=2.0,
        payment_retries=0,
        payment_outage_wait=outage_wait,
    )


async def test_a_provider_outage_pauses_the_sale_then_it_goes_on(settings):
    """Stripe answers 500 to the first charges, then recovers: the booking waits it out (same
    idempotency key: charged once) and is confirmed."""
    from tests.test_catalog import running
    from tests.test_payments import FakeStripe

    async with FakeStripe() as fake, running(on_fake_stripe(settings, fake, 30)) as (_, c):
        event_id, seats, _, _ = await published_event(c)
        auth = await buyer(c)
        fake.script = [500, 500, 503]
        response = await book(c, auth, {"event_id": event_id, "seat_ids": seats[:1]})
        assert response.status_code == 201, response.text
        assert len(fake.charges()) == 4
        assert len(fake.intents) == 1


async def test_a_provider_out_for_too_long_fails_unavailable_with_nothing_charged(settings):
    from tests.test_catalog import running
    from tests.test_payments import FakeStripe

    async with FakeStripe() as fake, running(on_fake_stripe(settings, fake, 1.0)) as (_, c):
        event_id, seats, _, _ = await published_event(c)
        auth = await buyer(c)
        fake.always = 500
        response = await book(c, auth, {"event_id": event_id, "seat_ids": seats[:1]})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert response.headers["retry-after"]
        assert len(fake.charges()) >= 2  # charged again before giving up
        assert fake.intents == []
        assert (await seat_statuses(c, event_id))[seats[0]] == "available"


async def test_same_key_same_body_is_one_booking_other_body_is_422(client, settings):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    body = {"event_id": event_id, "seat_ids": seats[:1]}
    first = await book(client, auth, body, key="same")
    second = await book(client, auth, body, key="same")
    assert first.status_code == second.status_code == 201
    assert first.json()["booking"]["id"] == second.json()["booking"]["id"]
    other = await book(client, auth, {"event_id": event_id, "seat_ids": seats[1:2]}, key="same")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_mismatch"
    conn = await db.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM bookings") == 1
    finally:
        await conn.close()
    missing = await client.post(
        "/bookings",
        headers=auth,
        json={
            "event_id": event_id,
            "seat_ids": seats[2:3],
            "payment": {"method": "card", "token": "tok_visa"},
        },
    )
    assert missing.status_code == 422
    assert missing.json()["error"]["details"]["fields"][0]["field"] == "Idempotency-Key"


async def test_concurrent_retries_with_one_key_make_one_booking(client, settings):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    body = {"event_id": event_id, "seat_ids": seats[:2]}
    responses = await asyncio.gather(*(book(client, auth, body, key="burst") for _ in range(6)))
    ids = {r.json()["booking"]["id"] for r in responses if r.status_code == 201}
    assert len(ids) == 1, [r.text for r in responses]
    conn = await db.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM bookings") == 1
    finally:
        await conn.close()


async def test_queued_request_then_its_status(client):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    response = await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]}, headers={})
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == "queued" and queued["position"] >= 1
    for _ in range(200):
        status = await client.get(f"/bookings/requests/{queued['request_id']}", headers=auth)
        if status.json()["status"] == "confirmed":
            break
        await asyncio.sleep(0.02)
    assert status.json() == {
        "request_id": queued["request_id"],
        "status": "confirmed",
        "booking_id": queued["request_id"],
    }
    stranger = await buyer(client)
    hidden = await client.get(f"/bookings/requests/{queued['request_id']}", headers=stranger)
    assert hidden.status_code == 404
    assert (
        await client.get(f"/bookings/{queued['request_id']}", headers=stranger)
    ).status_code == 404


async def test_purchase_is_the_synchronous_flow(client):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    response = await client.post(
        "/tickets/purchase",
        json={
            "event_id": event_id,
            "seat_ids": seats[:1],
            "payment": {"method": "card", "token": "tok_visa"},
        },
        headers={**auth, "Idempotency-Key": "p1"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["booking"]["status"] == "confirmed"


async def test_120_buyers_fight_over_30_seats(client, settings):
    event_id, seats, _, _ = await published_event(client, rows=3, per_row=10)
    buyers = await asyncio.gather(*(buyer(client, f"fight{i}") for i in range(120)))
    rng = random.Random(7)
    wanted = [rng.sample(seats, rng.randint(1, 2)) for _ in buyers]
    responses = await asyncio.gather(
        *(
            book(client, auth, {"event_id": event_id, "seat_ids": want})
            for auth, want in zip(buyers, wanted, strict=True)
        )
    )
    confirmed = [r.json()["booking"] for r in responses if r.status_code == 201]
    losers = [r for r in responses if r.status_code != 201]
    assert confirmed
    assert all(
        r.status_code == 409 and r.json()["error"]["code"] == "seat_unavailable" for r in losers
    ), {r.status_code for r in losers}
    sold_by_bookings = [i["seat_id"] for b in confirmed for i in b["items"]]
    assert len(sold_by_bookings) == len(set(sold_by_bookings)), "a seat was sold twice"
    statuses = await seat_statuses(client, event_id)
    assert {s for s, st in statuses.items() if st == "sold"} == set(sold_by_bookings)
    conn = await db.connect(settings.database_url)
    try:
        tickets = await conn.fetchval(
            "SELECT count(*) FROM tickets WHERE event_id = $1 AND status = 'valid'", event_id
        )
    finally:
        await conn.close()
    assert tickets == len(sold_by_bookings)


async def test_45_buyers_for_a_20_unit_quota(client):
    event_id, _, standing, _ = await published_event(client, capacity=20)
    buyers = await asyncio.gather(*(buyer(client, f"ga{i}") for i in range(45)))
    responses = await asyncio.gather(
        *(
            book(client, auth, {"event_id": event_id, "ticket_type_id": standing, "quantity": 1})
            for auth in buyers
        )
    )
    statuses = [r.status_code for r in responses]
    assert statuses.count(201) == 20
    assert all(r.json()["error"]["code"] == "sold_out" for r in responses if r.status_code != 201)
    detail = (await client.get(f"/events/{event_id}")).json()
    assert detail["ticket_types"][0]["remaining"] == 0


async def test_holds_conflict_release_and_expire(client, settings):
    event_id, seats, _, _ = await published_event(client)
    ann, bob = await buyer(client), await buyer(client)
    held = await client.post(
        "/holds", headers=ann, json={"event_id": event_id, "seat_ids": seats[:2]}
    )
    assert held.status_code == 201
    clash = await client.post(
        "/holds", headers=bob, json={"event_id": event_id, "seat_ids": seats[1:3]}
    )
    assert clash.status_code == 409
    assert clash.json()["error"]["code"] == "seat_unavailable"
    assert clash.json()["error"]["details"]["seat_ids"] == [seats[1]]
    # All or nothing: the free seat of the refused request was not taken either.
    assert (await seat_statuses(client, event_id))[seats[2]] == "available"
    assert (await client.delete(f"/holds/{held.json()['id']}", headers=bob)).status_code == 404
    assert (await client.delete(f"/holds/{held.json()['id']}", headers=ann)).status_code == 204
    assert (await seat_statuses(client, event_id))[seats[0]] == "available"
    again = await client.post(
        "/holds", headers=bob, json={"event_id": event_id, "seat_ids": seats[:2]}
    )
    assert again.status_code == 201
    conn = await db.connect(settings.database_url)
    try:
        await conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1",
            again.json()["id"],
        )
        await conn.execute(
            "UPDATE event_seats SET hold_expires_at = now() - interval '1 second' "
            "WHERE hold_id = $1",
            again.json()["id"],
        )
    finally:
        await conn.close()
    # Expired: available at once, before any sweeper runs.
    taken = await client.post(
        "/holds", headers=ann, json={"event_id": event_id, "seat_ids": seats[:1]}
    )
    assert taken.status_code == 201
    late = await book(client, bob, {"event_id": event_id, "hold_id": again.json()["id"]})
    assert late.status_code == 410
    assert late.json()["error"]["code"] == "hold_expired"


async def test_per_order_and_per_user_limits(client):
    event_id, seats, _, _ = await published_event(client, max_per_order=3)
    auth = await buyer(client)
    too_many = await client.post(
        "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:4]}
    )
    assert too_many.status_code == 422
    first = await client.post(
        "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[:2]}
    )
    assert first.status_code == 201
    second = await client.post(
        "/holds", headers=auth, json={"event_id": event_id, "seat_ids": seats[2:4]}
    )
    assert second.status_code == 409
    assert second.json()["error"]["details"]["limit"] == 3


async def test_cancel_refunds_releases_and_voids(client):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    booking = (await book(client, auth, {"event_id": event_id, "seat_ids": seats[:2]})).json()
    booking_id = booking["booking"]["id"]
    cancelled = await client.post(f"/bookings/{booking_id}/cancel", headers=auth)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["payment"]["status"] == "refunded"
    assert (await seat_statuses(client, event_id))[seats[0]] == "available"
    twice = await client.post(f"/bookings/{booking_id}/cancel", headers=auth)
    assert twice.status_code == 409
    stranger = await buyer(client)
    assert (
        await client.post(f"/bookings/{booking_id}/cancel", headers=stranger)
    ).status_code == 404
    mine = await client.get("/bookings?status=cancelled", headers=auth)
    assert [b["id"] for b in mine.json()["items"]] == [booking_id]
    assert (await client.get("/bookings?status=confirmed", headers=auth)).json()["items"] == []


async def test_a_full_queue_answers_503_and_keeps_nothing(settings, database_url):
    from asgi_lifespan import LifespanManager
    from httpx import ASGITransport, AsyncClient

    from bilten.app import create_app

    # No workers: requests wait in the queue, which holds two.
    quiet = settings.replace(roles=frozenset({"api"}), queue_max=2)
    async with LifespanManager(create_app(quiet)) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
        ) as c:
            event_id, seats, _, _ = await published_event(c)
            auth = await buyer(c)
            statuses = []
            for n in range(3):
                response = await book(
                    c, auth, {"event_id": event_id, "seat_ids": [seats[n]]}, key=f"q{n}", headers={}
                )
                statuses.append(response.status_code)
            assert statuses == [202, 202, 503]
            assert response.json()["error"]["code"] == "unavailable"
            assert response.headers["retry-after"]
    conn = await db.connect(database_url)
    try:
        # The refused request left no booking behind: a retry with its key starts afresh.
        assert (
            await conn.fetchval("SELECT count(*) FROM bookings WHERE idempotency_key = 'q2'") == 0
        )
    finally:
        await conn.close()


async def test_queue_positions_count_down(settings):
    from asgi_lifespan import LifespanManager
    from httpx import ASGITransport, AsyncClient

    from bilten.app import create_app

    quiet = settings.replace(roles=frozenset({"api"}))
    async with LifespanManager(create_app(quiet)) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
        ) as c:
            event_id, seats, _, _ = await published_event(c)
            auth = await buyer(c)
            queued = [
                (
                    await book(c, auth, {"event_id": event_id, "seat_ids": [seats[n]]}, headers={})
                ).json()
                for n in range(3)
            ]
    assert [q["position"] for q in queued] == [1, 2, 3]
    # A worker now drains the queue; the last request ends confirmed.
    async with LifespanManager(create_app(settings)) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
        ) as c:
            for _ in range(300):
                status = (
                    await c.get(f"/bookings/requests/{queued[2]['request_id']}", headers=auth)
                ).json()
                if status["status"] == "confirmed":
                    break
                await asyncio.sleep(0.02)
            assert status["status"] == "confirmed"


async def test_cancelling_an_event_refunds_its_bookings(client):
    event_id, seats, _, organizer = await published_event(client)
    auth = await buyer(client)
    booking = (await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]})).json()
    assert (await client.post(f"/events/{event_id}/cancel", headers=organizer)).status_code == 200
    for _ in range(300):  # cancelled (refunding) first, then refunded once the provider says so
        found = (await client.get(f"/bookings/{booking['booking']['id']}", headers=auth)).json()
        if found["status"] == "cancelled" and found["payment"]["status"] == "refunded":
            break
        await asyncio.sleep(0.02)
    assert found["status"] == "cancelled"
    assert found["payment"]["status"] == "refunded"


async def test_a_webhook_not_applied_is_applied_on_the_providers_retry(settings, monkeypatch):
    """The delivery is recorded only once applied: one that failed midway (a crash, a lost
    database) is not a duplicate when the provider sends it again."""
    import json
    import time

    from asgi_lifespan import LifespanManager
    from httpx import ASGITransport, AsyncClient

    from bilten.payments.webhooks import sign_stripe_payload
    from bilten.sagas import booking as saga

    secret = "whsec_test_secret"
    hooked = settings.replace(stripe_webhook_secret=secret)
    applied = []
    real = saga.apply_webhook

    async def flaky(app, kind, obj):
        if not applied:
            applied.append("failed")
            raise RuntimeError("the process died here")
        applied.append("applied")
        await real(app, kind, obj)

    monkeypatch.setattr(saga, "apply_webhook", flaky)
    payload = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "type": "charge.refunded",
            "data": {"object": {"metadata": {"booking_id": str(uuid.uuid4())}}},
        }
    ).encode()
    headers = {"Stripe-Signature": sign_stripe_payload(payload, secret, int(time.time()))}
    async with LifespanManager(create_app(hooked)) as manager:
        transport = ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://bilten.test") as c:
            url = "/payments/webhooks/stripe"
            assert (await c.post(url, content=payload, headers=headers)).status_code == 500
            again = await c.post(url, content=payload, headers=headers)
            assert again.json() == {"received": True, "duplicate": False}
            third = await c.post(url, content=payload, headers=headers)
            assert third.json() == {"received": True, "duplicate": True}
    assert applied == ["failed", "applied"]


async def test_stripe_webhooks_are_verified_and_deduplicated(settings):
    import json
    import time

    from asgi_lifespan import LifespanManager
    from httpx import ASGITransport, AsyncClient

    from bilten.app import create_app
    from bilten.payments.webhooks import sign_stripe_payload

    secret = "whsec_test_secret"
    hooked = settings.replace(stripe_webhook_secret=secret)
    payload = json.dumps(
        {
            "id": "evt_1",
            "type": "charge.refunded",
            "data": {"object": {"metadata": {"booking_id": str(uuid.uuid4())}}},
        }
    ).encode()
    now = int(time.time())
    async with LifespanManager(create_app(hooked)) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
        ) as c:
            url = "/payments/webhooks/stripe"

            def post(body, signature):
                headers = {"Stripe-Signature": signature} if signature else {}
                return c.post(url, content=body, headers=headers)

            assert (await post(payload, None)).status_code == 400
            huge = await post(b"{" + b" " * (300 * 1024) + b"}", None)
            assert huge.status_code == 413  # bounded before any signature work
            assert (
                await post(payload, sign_stripe_payload(payload, "whsec_other", now))
            ).status_code == 400
            stale = sign_stripe_payload(payload, secret, now - 600)
            assert (await post(payload, stale)).status_code == 400
            tampered = payload.replace(b"evt_1", b"evt_2")
            bad = await post(tampered, sign_stripe_payload(payload, secret, now))
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
            good = await post(payload, sign_stripe_payload(payload, secret, now))
            assert good.status_code == 200 and good.json() == {"received": True, "duplicate": False}
            again = await post(payload, sign_stripe_payload(payload, secret, now))
            assert again.json() == {"received": True, "duplicate": True}
            unknown = await c.post("/payments/webhooks/paypal", content=payload)
            assert unknown.status_code == 404
            long_time = await post(payload, "t=" + "1" * 5000 + ",v1=ab")
            assert long_time.status_code == 400, long_time.text
            # Signed, but not of the shape read: refused (the provider would retry a 500).
            for event in (
                {"id": "evt_3", "type": "charge.refunded", "data": "a string"},
                {"id": "evt_4", "type": "charge.refunded", "data": {"object": [1]}},
                {"id": "evt_5", "data": {"object": {"amount_refunded": "many"}}},
                {"id": "evt_6", "data": {"object": {"metadata": {"booking_id": 7}}}},
                {"id": "evt\u0000", "type": "charge.refunded"},
                {"id": "", "type": "charge.refunded"},
                {"type": "charge.refunded"},
            ):
                body = json.dumps(event).encode()
                answer = await post(body, sign_stripe_payload(body, secret, now))
                assert answer.status_code == 422, (event, answer.text)
                assert answer.json()["error"]["code"] == "validation_error"
    conn = await db.connect(settings.database_url)
    try:
        refused = await conn.fetchval(
            "SELECT count(*) FROM payment_webhook_events WHERE id = ANY ($1)",
            ["evt_3", "evt_4", "evt_5", "evt_6", ""],
        )
    finally:
        await conn.close()
    assert refused == 0  # nothing of the refused ones was written


async def test_one_batch_settles_each_booking_on_its_own(settings):
    """Requests of one batch: first come first served on a contested seat, a declined card,
    units and a hold, each succeeding or failing by itself."""
    from bilten import keys
    from bilten.sagas import batch
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, standing, _ = await published_event(c)
        ann, bob, cay, dan = [await buyer(c) for _ in range(4)]
        hold = (
            await c.post("/holds", headers=dan, json={"event_id": event_id, "seat_ids": seats[5:7]})
        ).json()
        requests = [
            (ann, {"event_id": event_id, "seat_ids": seats[:2]}, "tok_visa"),
            (bob, {"event_id": event_id, "seat_ids": seats[1:3]}, "tok_visa"),  # seat 1 taken
            (cay, {"event_id": event_id, "seat_ids": seats[3:4]}, "tok_chargeDeclined"),
            (cay, {"event_id": event_id, "ticket_type_id": standing, "quantity": 2}, "tok_visa"),
            (dan, {"event_id": event_id, "hold_id": hold["id"]}, "tok_visa"),
        ]
        ids = []
        for n, (auth, body, token) in enumerate(requests):
            response = await c.post(
                "/bookings",
                json={**body, "payment": {"method": "card", "token": token}},
                headers={**auth, "Idempotency-Key": f"batch-{n}"},
            )
            if n == 1:
                # Ann's queued request claims seat 1: Bob is refused at the door. Once the claim
                # is gone (claims expire), his request queues and the batch must arbitrate.
                assert response.status_code == 409, response.text
                assert response.json()["error"]["details"]["seat_ids"] == [seats[1]]
                await instance.state.redis.delete(keys.seat_claims(event_id))
                response = await c.post(
                    "/bookings",
                    json={**body, "payment": {"method": "card", "token": token}},
                    headers={**auth, "Idempotency-Key": f"batch-{n}"},
                )
            assert response.status_code == 202, response.text
            ids.append(response.json()["request_id"])
        entries = await queued(instance.state, event_id)
        assert [e.request_id for e in entries] == ids
        outcomes = await batch.run_batch(instance.state, entries)
        assert [o.state for o in outcomes] == [
            "CONFIRMED",
            "FAILED",
            "FAILED",
            "CONFIRMED",
            "CONFIRMED",
        ]
        assert outcomes[1].error.code == "seat_unavailable"
        assert outcomes[2].error.code == "payment_declined"
        statuses = await seat_statuses(c, event_id)
        assert [statuses[s] for s in seats[:7]] == [
            "sold",
            "sold",
            "available",
            "available",
            "available",
            "sold",
            "sold",
        ]
        for auth, booking_id, tickets in ((ann, ids[0], 2), (cay, ids[3], 2), (dan, ids[4], 2)):
            found = (await c.get(f"/bookings/{booking_id}", headers=auth)).json()
            assert found["status"] == "confirmed" and len(found["tickets"]) == tickets
        # No relay runs beside this API-only instance to announce the change: the door's copy
        # of the catalog (read when it took the requests) is dropped as the relay would.
        instance.state.caches.drop(event_id)
        detail = (await c.get(f"/events/{event_id}")).json()
        assert detail["ticket_types"][0]["remaining"] == 18
        # Running the same batch again changes nothing: every step checks the state first.
        again = await batch.run_batch(instance.state, entries)
        assert [o.state for o in again] == [o.state for o in outcomes]


async def test_one_hold_books_once(settings, database_url):
    from bilten.sagas import batch
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, _, standing, _ = await published_event(c, capacity=10)
        dan = await buyer(c)
        hold = (
            await c.post(
                "/holds",
                headers=dan,
                json={"event_id": event_id, "ticket_type_id": standing, "quantity": 2},
            )
        ).json()
        ids = []
        for n in range(2):
            response = await c.post(
                "/bookings",
                json={
                    "event_id": event_id,
                    "hold_id": hold["id"],
                    "payment": {"method": "card", "token": "tok_visa"},
                },
                headers={**dan, "Idempotency-Key": f"twice-{n}"},
            )
            ids.append(response.json()["request_id"])
        outcomes = await batch.run_batch(instance.state, await queued(instance.state, event_id))
        assert sorted(o.state for o in outcomes) == ["CONFIRMED", "FAILED"]
        assert next(o for o in outcomes if o.state == "FAILED").error.code == "conflict"
    conn = await db.connect(database_url)
    try:
        kind = await conn.fetchrow("SELECT sold, held FROM ticket_types WHERE id = $1", standing)
        tickets = await conn.fetchval(
            "SELECT count(*) FROM tickets WHERE event_id = $1 AND status = 'valid'", event_id
        )
    finally:
        await conn.close()
    assert (kind["sold"], kind["held"], tickets) == (2, 0, 2)


async def test_a_paid_booking_that_lost_a_seat_sells_none_and_refunds(settings, database_url):
    from bilten import payments
    from bilten.sagas import batch
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, _, _ = await published_event(c)
        ann, bob = await buyer(c), await buyer(c)
        hold = await c.post(
            "/holds", headers=ann, json={"event_id": event_id, "seat_ids": seats[:2]}
        )
        assert hold.status_code == 201
        booking_id = (
            await book(c, ann, {"event_id": event_id, "hold_id": hold.json()["id"]}, headers={})
        ).json()["request_id"]
        # Made and reserved (the hold taken over); the rest (payment, finish) never runs.
        await batch.begin_batch(instance.state, await queued(instance.state, event_id))
        state = await instance.state.db.fetchval(
            "SELECT saga_state FROM bookings WHERE id = $1", booking_id
        )
        assert state == "PAYMENT_PENDING"
        # The hold runs out on seat 1 during the payment and Bob takes the seat.
        conn = await db.connect(database_url)
        try:
            await conn.execute(
                "UPDATE event_seats SET hold_expires_at = now() - interval '1 second' "
                "WHERE event_id = $1 AND seat_id = $2",
                event_id,
                seats[1],
            )
        finally:
            await conn.close()
        taken = await c.post(
            "/holds", headers=bob, json={"event_id": event_id, "seat_ids": [seats[1]]}
        )
        assert taken.status_code == 201
        row = await instance.state.db.fetchrow(
            "SELECT total_cents, currency, payment_token FROM bookings WHERE id = $1", booking_id
        )
        charge = await instance.state.payments.charge(
            key=booking_id,
            amount_cents=row["total_cents"],
            currency=row["currency"],
            token=row["payment_token"],
        )
        assert isinstance(charge, payments.Charge)
        from bilten.sagas.finish import finish

        outcome = (await finish(instance.state, {booking_id: charge}))[booking_id]
        assert outcome.state == "FAILED" and outcome.error.code == "hold_expired"
        statuses = await seat_statuses(c, event_id)
        assert statuses[seats[0]] == "available"  # not sold under a failed booking
        assert statuses[seats[1]] == "held"  # Bob's
        found = (await c.get(f"/bookings/{booking_id}", headers=ann)).json()
        assert found["payment"]["status"] == "refunded" and found["tickets"] == []


async def test_a_queued_booking_holds_its_own_seats_and_units_until_it_ends(settings, database_url):
    """No hold row: the seats are sold to the booking when it is reserved, its units held on
    the ticket type; both count against the per-person limit while it pays, and a failed
    booking gives them back."""
    from bilten import payments
    from bilten.sagas import batch
    from bilten.sagas.finish import finish
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, standing, _ = await published_event(c, max_per_order=4)
        ann, bob = await buyer(c), await buyer(c)
        bodies = {
            "paid": {"event_id": event_id, "seat_ids": seats[:2]},
            "declined": {"event_id": event_id, "seat_ids": seats[2:3]},
            "units": {"event_id": event_id, "ticket_type_id": standing, "quantity": 1},
        }
        ids = {}
        for name, body in bodies.items():
            response = await book(c, ann, body, key=name, headers={})
            assert response.status_code == 202, response.text
            ids[name] = response.json()["request_id"]
        await batch.begin_batch(instance.state, await queued(instance.state, event_id))
        db_ = instance.state.db
        rows = await db_.fetch(
            "SELECT saga_state, hold_id FROM bookings WHERE id = ANY ($1::uuid[])",
            list(ids.values()),
        )
        assert [(r["saga_state"], r["hold_id"]) for r in rows] == [("PAYMENT_PENDING", None)] * 3
        assert await db_.fetchval("SELECT count(*) FROM holds WHERE event_id = $1", event_id) == 0
        sold_to = dict(
            await db_.fetch(
                "SELECT seat_id::text, booking_id::text FROM event_seats "
                "WHERE event_id = $1 AND status = 'sold'",
                event_id,
            )
        )
        assert sold_to == {
            seats[0]: ids["paid"],
            seats[1]: ids["paid"],
            seats[2]: ids["declined"],
        }
        assert await db_.fetchval("SELECT held FROM ticket_types WHERE id = $1", standing) == 1
        # Taken while they pay: another buyer cannot hold them; Ann is at her limit of 4.
        taken = await c.post(
            "/holds", headers=bob, json={"event_id": event_id, "seat_ids": seats[:1]}
        )
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "seat_unavailable"
        more = await c.post(
            "/holds", headers=ann, json={"event_id": event_id, "seat_ids": seats[5:6]}
        )
        assert more.status_code == 409, more.text
        results = {}
        for name in ("paid", "units"):
            row = await db_.fetchrow(
                "SELECT total_cents, currency, payment_token FROM bookings WHERE id = $1", ids[name]
            )
            results[ids[name]] = await instance.state.payments.charge(
                key=ids[name],
                amount_cents=row["total_cents"],
                currency=row["currency"],
                token=row["payment_token"],
            )
        results[ids["declined"]] = payments.PaymentDeclined("card_declined")
        outcomes = await finish(instance.state, results)
        assert {n: outcomes[i].state for n, i in ids.items()} == {
            "paid": "CONFIRMED",
            "declined": "FAILED",
            "units": "CONFIRMED",
        }
        statuses = await seat_statuses(c, event_id)
        assert [statuses[s] for s in seats[:3]] == ["sold", "sold", "available"]
        kind = await db_.fetchrow("SELECT sold, held FROM ticket_types WHERE id = $1", standing)
        assert (kind["sold"], kind["held"]) == (1, 0)
        tickets = await db_.fetch(
            "SELECT booking_id::text, seat_id::text FROM tickets WHERE event_id = $1", event_id
        )
        assert sorted((t["booking_id"], t["seat_id"]) for t in tickets) == sorted(
            [(ids["paid"], seats[0]), (ids["paid"], seats[1]), (ids["units"], None)]
        )
        # The declined seat is free again, and Ann (3 tickets now) may hold one more.
        again = await c.post(
            "/holds", headers=ann, json={"event_id": event_id, "seat_ids": seats[2:3]}
        )
        assert again.status_code == 201, again.text


async def test_a_ticket_type_of_another_event_touches_nothing(settings, database_url):
    from bilten.sagas import batch
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_a, _, _, _ = await published_event(c)
        event_b, _, standing_b, _ = await published_event(c, capacity=5)
        eve = await buyer(c)
        held = (
            await c.post(
                "/holds",
                headers=eve,
                json={"event_id": event_b, "ticket_type_id": standing_b, "quantity": 2},
            )
        ).json()
        conn = await db.connect(database_url)
        try:
            await conn.execute(
                "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1",
                held["id"],
            )
        finally:
            await conn.close()
        mallory, mallory_id = await register(c, f"mallory-{uuid.uuid4().hex[:8]}@x.com")
        wanted = {"ticket_type_id": standing_b, "quantity": 1}
        door = await book(c, mallory, {"event_id": event_a, **wanted}, headers={})
        assert door.status_code == 422, door.text  # the door knows event A's types
        # Had it not known them (its cache cold and the database out of reach, say), the
        # worker is the last guard: the request, queued as the door would have queued it.
        request = queue.Request(
            id=queue.new_request_id(event_a),
            user_id=mallory_id,
            event_id=event_a,
            key="mallory",
            digest="d",
            request={"seat_ids": [], **wanted},
            provider=instance.state.payments.name,
            token="tok_visa",
        )
        await queue.submit(instance.state.pipeline, request, 1000, -1)
        [entry] = await queued(instance.state, event_a)
        assert entry.request_id == request.id
        [outcome] = await batch.run_batch(instance.state, [entry])
        assert outcome.state == "FAILED" and outcome.error.code == "validation_error"
    conn = await db.connect(database_url)
    try:
        status = await conn.fetchval("SELECT status FROM holds WHERE id = $1", held["id"])
        kind = await conn.fetchrow("SELECT held, sold FROM ticket_types WHERE id = $1", standing_b)
    finally:
        await conn.close()
    # Event B's expired hold is left for B's own claims and sweeper to settle consistently.
    assert (status, kind["held"], kind["sold"]) == ("active", 2, 0)


async def test_a_sold_seat_is_refused_before_the_queue(client, settings):
    event_id, seats, _, _ = await published_event(client)
    ann, bob = await buyer(client), await buyer(client)
    assert (
        await book(client, ann, {"event_id": event_id, "seat_ids": seats[:1]})
    ).status_code == 201
    late = await book(
        client, bob, {"event_id": event_id, "seat_ids": seats[:2]}, key="late", headers={}
    )
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "seat_unavailable"
    assert late.json()["error"]["details"]["seat_ids"] == [seats[0]]
    conn = await db.connect(settings.database_url)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM bookings WHERE idempotency_key = 'late'") == 0
        )
    finally:
        await conn.close()
    # The seat the refused request also wanted is untouched.
    assert (await seat_statuses(client, event_id))[seats[1]] == "available"


async def test_a_seat_wanted_by_a_queued_request_is_refused_at_once(settings, database_url):
    """The door claims a queued request's seats: a second request for one of them is refused
    without queueing; when the first fails, its seats can be asked for again at once."""
    from bilten.sagas import batch
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, _, _ = await published_event(c)
        ann, bob = await buyer(c), await buyer(c)
        first = await c.post(
            "/bookings",
            json={
                "event_id": event_id,
                "seat_ids": seats[:2],
                "payment": {"method": "card", "token": "tok_chargeDeclined"},
            },
            headers={**ann, "Idempotency-Key": "first"},
        )
        assert first.status_code == 202
        refused = await book(
            c, bob, {"event_id": event_id, "seat_ids": seats[1:3]}, key="second", headers={}
        )
        assert refused.status_code == 409
        assert refused.json()["error"]["details"]["seat_ids"] == [seats[1]]
        assert len(await queued(instance.state, event_id)) == 1  # nothing of Bob's queued
        # Ann's card is declined: the worker gives her seats back to the door too.
        from bilten import queue
        from bilten.sagas import booking

        entries = await queued(instance.state, event_id)
        outcomes = await batch.run_batch(instance.state, entries)
        assert outcomes[0].error.code == "payment_declined"
        async with instance.state.redis.pipeline(transaction=False) as pipe:
            queue.settle_claims(pipe, entries, outcomes)
            booking.add_announcements(pipe, outcomes)
            await pipe.execute()
        again = await book(
            c, bob, {"event_id": event_id, "seat_ids": seats[1:3]}, key="third", headers={}
        )
        assert again.status_code == 202, again.text
        # The request status reads the announced outcome.
        status = await c.get(f"/bookings/requests/{first.json()['request_id']}", headers=ann)
        assert status.json()["status"] == "failed"
        assert status.json()["error"]["code"] == "payment_declined"


async def test_a_sold_seat_no_longer_claimed_is_still_refused_by_the_database(client, redis):
    """Sold seats are refused at the door for a while; after that the worker refuses them."""
    from bilten import keys

    event_id, seats, _, _ = await published_event(client)
    ann, bob = await buyer(client), await buyer(client)
    sold = await book(client, ann, {"event_id": event_id, "seat_ids": seats[:1]})
    assert sold.status_code == 201
    await redis.delete(keys.seat_claims(event_id))  # as if the claim had expired
    late = await book(client, bob, {"event_id": event_id, "seat_ids": seats[:2]})
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "seat_unavailable"
    assert late.json()["error"]["details"]["seat_ids"] == [seats[0]]
    # Refused in the queue, its other seat is free again, at the door too.
    assert (await seat_statuses(client, event_id))[seats[1]] == "available"
    again = await book(client, bob, {"event_id": event_id, "seat_ids": seats[1:2]})
    assert again.status_code == 201, again.text


async def test_a_cancelled_booking_gives_its_seats_back_to_the_door(client):
    event_id, seats, _, _ = await published_event(client)
    ann, bob = await buyer(client), await buyer(client)
    booking = (await book(client, ann, {"event_id": event_id, "seat_ids": seats[:1]})).json()
    refused = await book(client, bob, {"event_id": event_id, "seat_ids": seats[:1]})
    assert refused.status_code == 409
    cancelled = await client.post(f"/bookings/{booking['booking']['id']}/cancel", headers=ann)
    assert cancelled.status_code == 200
    again = await book(client, bob, {"event_id": event_id, "seat_ids": seats[:1]})
    assert again.status_code == 201, again.text


async def test_a_key_redis_forgot_still_finds_its_booking(client, redis, database_url):
    """Idempotency-Keys live in Redis for a day; should Redis lose one, the database's unique
    index still ties a retry to the first booking, and another body to a 422."""
    from bilten import keys

    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    body = {"event_id": event_id, "seat_ids": seats[:1]}
    first = await book(client, auth, body, key="kept")
    assert first.status_code == 201
    booking_id = first.json()["booking"]["id"]
    found = [k async for k in redis.scan_iter(keys.idempotency(event_id, "*", "kept"))]
    assert len(found) == 1
    await redis.delete(*found, keys.seat_claims(event_id))
    again = await book(client, auth, body, key="kept")
    assert again.status_code == 201, again.text
    assert again.json()["booking"]["id"] == booking_id
    await redis.delete(*found)
    other = await book(client, auth, {"event_id": event_id, "seat_ids": seats[1:2]}, key="kept")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_mismatch"
    conn = await db.connect(database_url)
    try:
        kept = "SELECT count(*) FROM bookings WHERE idempotency_key = 'kept'"
        assert await conn.fetchval(kept) == 1
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM event_seats WHERE event_id = $1 AND status = 'sold'", event_id
            )
            == 1
        )
    finally:
        await conn.close()


async def test_an_entry_taken_over_after_its_reservation_is_paid_once_and_finished(settings):
    """A worker that stopped after reserving (PAYMENT_PENDING committed, nothing announced):
    whoever takes the entry over charges with the same key (one charge) and finishes it; the
    waiting client, whose outcome message never came, still gets its answer from the database
    when its wait runs out."""
    from bilten import keys
    from bilten.sagas import batch
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, _, _ = await published_event(c)
        auth = await buyer(c)
        first = await book(
            c, auth, {"event_id": event_id, "seat_ids": seats[:2]}, key="over", headers={}
        )
        assert first.status_code == 202
        request_id = first.json()["request_id"]
        entries = await queued(instance.state, event_id)
        await batch.begin_batch(instance.state, entries)  # reserved; the rest never runs
        row = await instance.state.db.fetchrow(
            "SELECT saga_state FROM bookings WHERE id = $1", request_id
        )
        assert row["saga_state"] == "PAYMENT_PENDING"
        outcomes = await batch.run_batch(instance.state, entries)  # taken over
        assert [o.state for o in outcomes] == ["CONFIRMED"]
        again = await batch.run_batch(instance.state, entries)  # and once more: no change
        assert [o.state for o in again] == ["CONFIRMED"]
        ledger = await instance.state.redis.hgetall(keys.test_payment(request_id))
        assert ledger[b"status"] == b"succeeded"  # one ledger entry per key: charged once
        # No announcement was made: a retry waits a moment, then reads the database.
        retry = await book(
            c,
            auth,
            {"event_id": event_id, "seat_ids": seats[:2]},
            key="over",
            headers={"Prefer": "wait=0.2"},
        )
        assert retry.status_code == 201, retry.text
        assert retry.json()["booking"]["id"] == request_id
        assert len(retry.json()["booking"]["tickets"]) == 2


async def test_a_batch_longer_than_the_lease_keeps_it_and_a_lost_lease_stops_the_drain(
    settings, monkeypatch
):
    from bilten import keys
    from bilten.sagas import batch, booking
    from bilten.workers import bookings as bookings_worker
    from tests.test_catalog import running

    monkeypatch.setattr(bookings_worker, "BATCH", 1)  # a batch per request
    quiet = settings.replace(roles=frozenset({"api"}), queue_lease_ms=300)
    async with running(quiet) as (instance, c):
        app = instance.state
        event_id, seats, _, _ = await published_event(c)
        for n in range(2):
            auth = await buyer(c)
            queued_ = await book(
                c, auth, {"event_id": event_id, "seat_ids": seats[n : n + 1]}, headers={}
            )
            assert queued_.status_code == 202
        lease = keys.queue_lease(event_id)
        await app.redis.set(lease, "me", px=300)
        seen: list[bytes | None] = []

        async def slow_begin(app, entries):
            await asyncio.sleep(1.0)  # over three times the lease
            seen.append(await app.redis.get(lease))
            await app.redis.set(lease, "someone else", px=300)  # now it is taken from us
            await asyncio.sleep(0.3)  # the keeper's next renewal finds out
            return await batch.begin_batch(app, entries)

        done = await bookings_worker.drain(
            app, event_id, "me", slow_begin, booking.add_announcements
        )
        assert seen == [b"me"]  # renewed all along the first batch
        assert done == 1  # the batch in hand finished; no other began once the lease was gone
        assert len(await queued(app, event_id)) == 1


async def test_a_slow_charge_holds_up_only_its_own_booking_within_a_batch(settings):
    """Waves of finishes: of two bookings in one batch, the one whose charge is answered at
    once is confirmed (and its entry done) while the other's charge still takes three seconds."""
    import time

    from bilten.sagas import batch
    from tests.test_catalog import running
    from tests.test_payments import FakeStripe

    async with FakeStripe() as fake:
        own = on_fake_stripe(settings, fake, 30).replace(
            payment_timeout=10.0, roles=frozenset({"api"})
        )
        async with running(own) as (instance, c):
            event_id, seats, _, _ = await published_event(c)
            for n in range(2):
                auth = await buyer(c)
                body = {"event_id": event_id, "seat_ids": seats[n : n + 1]}
                assert (await book(c, auth, body, headers={})).status_code == 202
            entries = await queued(instance.state, event_id)
            assert len(entries) == 2
            fake.late_by = 3.0
            fake.script = ["late"]  # whichever charge comes first is answered after 3 s
            began = time.monotonic()
            rest = await batch.begin_batch(instance.state, entries)
            waves = []
            async for wave in rest():
                waves.append((time.monotonic() - began, [o.state for _, o in wave if o]))
    assert [states for _, states in waves] == [["CONFIRMED"], ["CONFIRMED"]]
    assert waves[0][0] < 2.0 and waves[1][0] > 2.9


async def test_a_slow_charge_holds_up_only_its_own_batch(settings):
    """Payments off the ordering path: while the first booking's charge takes three seconds,
    a later booking of the same event is reserved, paid and confirmed."""
    import time

    from tests.test_catalog import running
    from tests.test_payments import FakeStripe

    async with FakeStripe() as fake:
        own = on_fake_stripe(settings, fake, 30).replace(payment_timeout=10.0)
        async with running(own) as (_, c):
            event_id, seats, _, _ = await published_event(c)
            ann, bob = await buyer(c), await buyer(c)
            fake.late_by = 3.0
            fake.script = ["late"]  # the first charge answers after three seconds
            slow = asyncio.ensure_future(
                book(c, ann, {"event_id": event_id, "seat_ids": seats[:1]})
            )
            await asyncio.sleep(0.3)
            began = time.monotonic()
            quick = await book(c, bob, {"event_id": event_id, "seat_ids": seats[1:2]})
            assert quick.status_code == 201, quick.text
            assert time.monotonic() - began < 2.0
            assert not slow.done()  # still paying
            assert (await slow).status_code == 201


async def test_a_hung_charge_holds_up_only_its_own_booking(settings):
    """One batch may pay at a time (``queue_in_flight`` 1), yet a charge that never answers
    holds up no later booking: the limit counts requests in hand, not batches, so the next
    batch reserves and pays while the first one's straggler waits for its timeout."""
    own = settings.replace(
        queue_in_flight=1, payment_timeout=2.0, payment_retries=0, payment_outage_wait=2.0
    )
    async with LifespanManager(create_app(own)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bilten.test") as c:
            event_id, seats, _, _ = await published_event(c)
            slow = await buyer(c)
            hung = await c.post(
                "/bookings",
                json={
                    "event_id": event_id,
                    "seat_ids": seats[:1],
                    "payment": {"method": "card", "token": "tok_hang"},
                },
                headers={**slow, "Idempotency-Key": uuid.uuid4().hex},
            )
            assert hung.status_code == 202, hung.text
            status_url = f"/bookings/requests/{hung.json()['request_id']}"
            await asyncio.sleep(0.3)  # its batch is paying
            others = [await buyer(c) for _ in range(4)]
            answers = await asyncio.gather(
                *(
                    book(c, auth, {"event_id": event_id, "seat_ids": [seats[n + 1]]})
                    for n, auth in enumerate(others)
                )
            )
            assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
            still = (await c.get(status_url, headers=slow)).json()
            assert still["status"] in ("queued", "processing"), still  # its charge hangs on
            for _ in range(150):
                await asyncio.sleep(0.1)
                ended = (await c.get(status_url, headers=slow)).json()
                if ended["status"] not in ("queued", "processing"):
                    break
            assert ended["status"] == "failed", ended


async def test_the_door_refuses_units_the_worker_found_gone(client, settings, monkeypatch):
    """Once the worker could not cover a request for units, the door refuses requests for more
    than it found left (409 ``sold_out``, nothing queued or written); requests within what is
    left still queue and win. Past the worker's moment the door still knows, from its catalog
    cache: it refuses until units come back, and then takes requests again at once. A request
    made again with its Idempotency-Key gets its own answer, never the door's refusal."""
    from bilten import queue

    monkeypatch.setattr(queue, "UNITS_LEFT_TTL_MS", 500)
    event_id, _, standing, _ = await published_event(client, capacity=3)

    async def units(n, auth=None, key=None):
        auth = auth or await buyer(client)
        body = {"event_id": event_id, "ticket_type_id": standing, "quantity": n}
        return await book(client, auth, body, key=key)

    first_buyer = await buyer(client)
    first = await units(2, first_buyer, key="first")
    assert first.status_code == 201
    late = await units(2)  # queued, refused by the worker: one left
    assert late.status_code == 409 and late.json()["error"]["details"]["remaining"] == 1
    conn = await db.connect(settings.database_url)
    try:
        before = await conn.fetchval("SELECT count(*) FROM bookings")
        door = await units(2)  # refused at the door
        assert door.status_code == 409, door.text
        assert door.json()["error"] == {
            "code": "sold_out",
            "message": "Only 1 left of this ticket type.",
            "details": {"ticket_type_id": standing, "remaining": 1},
        }
        assert await conn.fetchval("SELECT count(*) FROM bookings") == before
        assert (await units(1)).status_code == 201  # within what is left: queued, and it wins
        await asyncio.sleep(0.6)  # the worker's word has lapsed; the catalog still knows
        for _ in range(3):
            again = await units(1)
            assert again.status_code == 409 and again.json()["error"]["details"]["remaining"] == 0
        assert await conn.fetchval("SELECT count(*) FROM bookings") == before + 1
        repeat = await units(2, first_buyer, key="first")  # its own answer: confirmed
        assert (
            repeat.status_code == 201
            and repeat.json()["booking"]["id"] == first.json()["booking"]["id"]
        )
        # Units come back (a cancelled booking): the door takes requests for them at once.
        booking_id = first.json()["booking"]["id"]
        cancelled = await client.post(f"/bookings/{booking_id}/cancel", headers=first_buyer)
        assert cancelled.status_code == 200, cancelled.text
        deadline = asyncio.get_running_loop().time() + 3
        while (back := await units(2)).status_code == 409:
            assert asyncio.get_running_loop().time() < deadline, back.text
            await asyncio.sleep(0.05)
        assert back.status_code == 201, back.text
    finally:
        await conn.close()


@hsettings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    capacity=st.integers(1, 10),
    waves=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=6), min_size=1, max_size=4),
)
async def test_units_are_never_oversold_and_a_refusal_always_asked_for_too_many(
    client, settings, capacity, waves
):
    """Waves of concurrent buyers ask for units (each wave once the one before was answered,
    so the door has the worker's findings): never more sold than the capacity, and a buyer
    refused ``sold_out``, at the door or by the worker, asked for more than was left at the end
    (units only go: every card is accepted)."""
    event_id, _, standing, _ = await published_event(client, capacity=capacity, max_per_order=4)

    async def units(n):
        body = {"event_id": event_id, "ticket_type_id": standing, "quantity": n}
        return n, await book(client, await buyer(client), body)

    answers = []
    for wave in waves:
        answers += await asyncio.gather(*(units(n) for n in wave))
    sold = sum(n for n, a in answers if a.status_code == 201)
    refused = [n for n, a in answers if a.status_code == 409]
    assert all(a.status_code in (201, 409) for _, a in answers), [a.text for _, a in answers]
    assert all(a.json()["error"]["code"] == "sold_out" for _, a in answers if a.status_code == 409)
    conn = await db.connect(settings.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT sold, held, capacity FROM ticket_types WHERE id = $1", standing
        )
    finally:
        await conn.close()
    assert row["sold"] == sold <= capacity and row["held"] == 0
    assert all(n > capacity - sold for n in refused)


async def test_a_booking_of_the_same_key_written_meanwhile_is_found_and_nothing_is_left_held(
    settings, database_url
):
    """The first step sorts requests out before it writes their bookings. A booking of the same
    user and Idempotency-Key written meanwhile (by another event's worker) makes the step run
    again: the request then finds that booking, and the seats it had reserved are not kept."""
    from bilten.sagas import batch
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, _, _ = await published_event(c)
        other_event, _, _, _ = await published_event(c)
        ann = await buyer(c)
        me = (await c.get("/auth/me", headers=ann)).json()
        request_id = (
            await book(c, ann, {"event_id": event_id, "seat_ids": seats[:2]}, key="k1", headers={})
        ).json()["request_id"]
        [entry] = await queued(instance.state, event_id)
        racer = await db.connect(database_url)
        try:
            writing = racer.transaction()
            await writing.start()
            await racer.execute(
                """INSERT INTO bookings (id, user_id, event_id, idempotency_key, body_hash,
                                         request, currency, payment_provider, payment_token)
                   VALUES (gen_random_uuid(), $1, $2, 'k1', 'another body', '{}', 'EUR',
                           'test', 'tok_visa')""",
                me["id"],
                other_event,
            )
            running_batch = asyncio.ensure_future(batch.run_batch(instance.state, [entry]))
            await asyncio.sleep(0.5)  # its insert waits for ours
            assert not running_batch.done()
            await writing.commit()
            [outcome] = await asyncio.wait_for(running_batch, 10)
        finally:
            await racer.close()
        assert outcome.state == "FAILED" and outcome.error.code == "idempotency_mismatch"
        assert outcome.booking_id == request_id
        statuses = await seat_statuses(c, event_id)
        assert [statuses[s] for s in seats[:2]] == ["available", "available"]
    conn = await db.connect(database_url)
    try:
        made = await conn.fetchval("SELECT count(*) FROM bookings WHERE user_id = $1", me["id"])
        holds = await conn.fetchval("SELECT count(*) FROM holds WHERE user_id = $1", me["id"])
    finally:
        await conn.close()
    assert (made, holds) == (1, 0)


@hsettings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    wants=st.lists(
        st.tuples(
            st.integers(0, 2),  # buyer
            st.integers(0, 2),  # Idempotency-Key
            st.sets(st.integers(0, 5), min_size=1, max_size=2),  # seats
        ),
        min_size=1,
        max_size=10,
    )
)
async def test_a_batch_sorts_out_keys_and_seats_as_arrival_order_says(settings, wants):
    """Queued requests in one batch (as Redis hands them over after it lost their keys: the
    same user and key may come more than once), run twice: the first request of each user and
    key makes the booking and gets the seats if they are still free in arrival order; a later
    one with the same body stands for that booking, with another body it fails
    ``idempotency_mismatch``. Nothing is sold twice, every booking is written once."""
    from bilten import queue
    from bilten.sagas import batch
    from tests.test_catalog import running

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, c):
        event_id, seats, _, _ = await published_event(c)
        users = []
        for _ in range(3):
            auth = await buyer(c)
            users.append((await c.get("/auth/me", headers=auth)).json()["id"])
        entries = []
        for n, (who, key, wanted) in enumerate(wants):
            picked = sorted(seats[s] for s in wanted)
            request = queue.Request(
                id=queue.new_request_id(event_id),
                user_id=users[who],
                event_id=event_id,
                key=f"k{key}",
                digest=f"seats {sorted(wanted)}",
                request={"seat_ids": picked, "ticket_type_id": None, "quantity": len(picked)},
                provider="test",
                token="tok_visa",
            )
            entries.append(queue.Entry(f"{n + 1}-0".encode(), request.id, request))
        # The model: arrival order decides.
        first: dict[tuple[str, str], queue.Request] = {}
        taken: set[str] = set()
        expected = []
        for entry in entries:
            request = entry.request
            mine = first.setdefault((request.user_id, request.key), request)
            if mine is not request:
                same = mine.digest == request.digest
                expected.append((mine.id, None) if same else (request.id, "idempotency_mismatch"))
                continue
            wanted_seats = set(request.request["seat_ids"])
            if wanted_seats & taken:
                expected.append((request.id, "seat_unavailable"))
            else:
                taken |= wanted_seats
                expected.append((request.id, "CONFIRMED"))
        states = {b: s for b, s in expected if s in ("CONFIRMED", "seat_unavailable")}
        # The first half alone (then the whole batch again: those are written already, the
        # rest new), and once more: nothing changes.
        half = len(entries) // 2
        for run in (entries[:half], entries, entries):
            outcomes = await batch.run_batch(instance.state, run)
            for outcome, (booking_id, want) in zip(outcomes, expected, strict=False):
                assert outcome is not None and outcome.booking_id == booking_id
                if want == "CONFIRMED":
                    assert outcome.state == "CONFIRMED"
                elif want is None:  # stands for the first one's booking
                    assert outcome.state in ("PENDING", states[booking_id]) or (
                        outcome.state == "FAILED" and states[booking_id] == "seat_unavailable"
                    )
                else:
                    assert outcome.state == "FAILED" and outcome.error.code == want
        rows = await instance.state.db.fetch(
            "SELECT id::text, saga_state FROM bookings WHERE event_id = $1", event_id
        )
        written = {r["id"]: r["saga_state"] for r in rows}
        assert written == {
            b: ("CONFIRMED" if s == "CONFIRMED" else "FAILED") for b, s in states.items()
        }
        sold = await instance.state.db.fetch(
            "SELECT seat_id::text FROM tickets WHERE event_id = $1", event_id
        )
        assert sorted(r["seat_id"] for r in sold) == sorted(taken)
