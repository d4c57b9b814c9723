"""Money rules: who may cancel, refunds as durable intent, charges whose outcome was unknown."""

import asyncio
import signal
import time
import uuid

import httpx
import pytest

from bilten import db, keys
from bilten.sagas import recovery
from tests.catalog_helpers import PASSWORD
from tests.test_bookings import book, buyer, on_fake_stripe, published_event
from tests.test_catalog import running
from tests.test_payments import FakeStripe


async def ledger(redis, booking_id):
    return {
        k.decode(): v.decode()
        for k, v in (await redis.hgetall(keys.test_payment(booking_id))).items()
    }


async def check_in(client, organizer, code):
    return await client.post("/tickets/check-in", headers=organizer, json={"code": code})


async def test_a_used_ticket_is_never_refunded_by_its_buyer(client, redis):
    event_id, seats, _, organizer = await published_event(client)
    auth = await buyer(client)
    booked = (await book(client, auth, {"event_id": event_id, "seat_ids": seats[:2]})).json()
    booking = booked["booking"]
    assert (await check_in(client, organizer, booking["tickets"][0]["code"])).status_code == 200
    refused = await client.post(f"/bookings/{booking['id']}/cancel", headers=auth)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["details"]["reason"] == "checked_in"
    found = (await client.get(f"/bookings/{booking['id']}", headers=auth)).json()
    assert found["status"] == "confirmed" and found["payment"]["status"] == "succeeded"
    assert (await ledger(redis, booking["id"]))["status"] == "succeeded"  # the money is kept


async def test_no_cancel_once_the_event_has_begun_and_no_second_cancel(client, database_url):
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    first = (await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]})).json()
    second = (await book(client, auth, {"event_id": event_id, "seat_ids": seats[1:2]})).json()
    done = await client.post(f"/bookings/{first['booking']['id']}/cancel", headers=auth)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "cancelled"
    assert done.json()["payment"]["status"] == "refunded"
    again = await client.post(f"/bookings/{first['booking']['id']}/cancel", headers=auth)
    assert again.status_code == 409
    assert again.json()["error"]["details"]["reason"] == "already_cancelled"
    conn = await db.connect(database_url)
    try:
        await conn.execute(
            "UPDATE events SET starts_at = now() - interval '1 minute' WHERE id = $1", event_id
        )
    finally:
        await conn.close()
    late = await client.post(f"/bookings/{second['booking']['id']}/cancel", headers=auth)
    assert late.status_code == 409
    assert late.json()["error"]["details"]["reason"] == "event_started"


async def test_a_cancel_and_a_check_in_of_one_ticket_never_both_win(client, redis):
    event_id, seats, _, organizer = await published_event(client, rows=2, per_row=10)
    outcomes = []
    for seat in seats[:12]:
        auth = await buyer(client)
        booking = (await book(client, auth, {"event_id": event_id, "seat_ids": [seat]})).json()[
            "booking"
        ]
        cancel, scan = await asyncio.gather(
            client.post(f"/bookings/{booking['id']}/cancel", headers=auth),
            check_in(client, organizer, booking["tickets"][0]["code"]),
        )
        won = (cancel.status_code == 200, scan.status_code == 200)
        assert won in ((True, False), (False, True)), (cancel.text, scan.text)
        ticket = (await client.get(f"/tickets/{booking['tickets'][0]['id']}", headers=auth)).json()
        money = await ledger(redis, booking["id"])
        if won[0]:  # cancelled: the ticket is void, the money back
            assert scan.status_code == 404
            assert ticket["status"] == "void" and money["status"] == "refunded"
        else:  # in the hall: the money is kept
            assert cancel.json()["error"]["details"]["reason"] == "checked_in"
            assert ticket["status"] == "checked_in" and money["status"] == "succeeded"
        outcomes.append(won)
    print(f"cancel won {sum(c for c, _ in outcomes)}, check-in won {sum(s for _, s in outcomes)}")


async def test_an_organizer_cancelling_the_event_refunds_even_used_tickets(client, redis):
    event_id, seats, _, organizer = await published_event(client)
    auth = await buyer(client)
    booking = (await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]})).json()[
        "booking"
    ]
    assert (await check_in(client, organizer, booking["tickets"][0]["code"])).status_code == 200
    assert (await client.post(f"/events/{event_id}/cancel", headers=organizer)).status_code == 200
    deadline = time.monotonic() + 10
    while (found := (await client.get(f"/bookings/{booking['id']}", headers=auth)).json())[
        "payment"
    ]["status"] != "refunded":
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.1)
    assert found["status"] == "cancelled"
    assert (await ledger(redis, booking["id"]))["status"] == "refunded"
    stats = (await client.get(f"/events/{event_id}/stats", headers=organizer)).json()
    assert stats["refunds"] == {"count": 1, "amount_cents": 4500, "pending": 0, "dead": 0}


async def test_a_refund_the_provider_cannot_make_now_is_made_later(settings):
    """Cancelled while Stripe answers 500: the booking is cancelled at once (refunding), and the
    refund worker makes the refund once Stripe answers again."""
    async with FakeStripe() as fake, running(on_fake_stripe(settings, fake, 1.0)) as (app, c):
        event_id, seats, _, organizer = await published_event(c)
        auth = await buyer(c)
        booking = (await book(c, auth, {"event_id": event_id, "seat_ids": seats[:1]})).json()[
            "booking"
        ]
        fake.always = 500
        cancelled = await c.post(f"/bookings/{booking['id']}/cancel", headers=auth)
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["payment"]["status"] == "refunding"
        assert fake.refunds == []
        row = await app.state.db.fetchrow(
            "SELECT status, attempts, last_error FROM refunds WHERE booking_id = $1", booking["id"]
        )
        assert row["status"] == "pending" and row["attempts"] == 1 and "500" in row["last_error"]
        # Meanwhile the provider tells of a refund of part of the payment, made otherwise: it
        # does not settle the booking's own.
        from bilten.payments import webhooks
        from bilten.sagas import booking as saga

        mine = webhooks.Metadata(booking_id=booking["id"])
        part = webhooks.EventObject(amount_refunded=1000, metadata=mine)
        await saga.apply_webhook(app.state, "charge.refunded", part)
        still = await app.state.db.fetchval(
            "SELECT status FROM refunds WHERE booking_id = $1", booking["id"]
        )
        assert still == "pending"
        fake.always = None
        await app.state.db.execute("UPDATE refunds SET next_at = now()")  # its pause is over
        assert await recovery.run_once(app.state) >= 1
        found = (await c.get(f"/bookings/{booking['id']}", headers=auth)).json()
        assert found["payment"]["status"] == "refunded"
        assert len(fake.refunds) == 1
        stats = (await c.get(f"/events/{event_id}/stats", headers=organizer)).json()
        assert stats["refunds"]["count"] == 1 and stats["refunds"]["pending"] == 0


async def test_a_timeout_then_the_charge_is_found_confirmed_never_failed_with_money(settings):
    """Stripe takes the money but answers after the client's timeout: the retry with the same
    key replays the charge, and the booking is confirmed, charged once."""
    async with FakeStripe() as fake:
        own = on_fake_stripe(settings, fake, 30).replace(payment_timeout=0.5, payment_retries=2)
        async with running(own) as (_, c):
            event_id, seats, _, _ = await published_event(c)
            auth = await buyer(c)
            fake.late_by = 1.0
            fake.script = ["late"]
            response = await book(c, auth, {"event_id": event_id, "seat_ids": seats[:1]})
            assert response.status_code == 201, response.text
            assert len(fake.intents) == 1 and len(fake.charges()) == 2


@pytest.mark.parametrize("made_long_ago", [False, True])
async def test_a_charge_found_late_for_a_failed_booking_is_refunded(
    settings, monkeypatch, made_long_ago
):
    """No retry, the provider's answer lost and its search index behind: the booking fails
    (its payment unknown), the lookups find nothing at first, then find the charge, and it is
    refunded. The buyer never keeps paying for nothing, however long ago the booking was made
    (one that waited out an outage gets the whole window from its failure)."""
    monkeypatch.setattr(recovery, "SETTLE_EVERY", 0)
    monkeypatch.setattr(recovery, "SETTLE_WINDOW", 60)
    async with FakeStripe() as fake:
        own = on_fake_stripe(settings, fake, 0.2).replace(payment_timeout=0.5)
        async with running(own.replace(roles=frozenset({"api", "workers"}))) as (app, c):
            event_id, seats, _, _ = await published_event(c)
            auth = await buyer(c)
            fake.late_by = 1.0
            fake.search_lag = 5.0 if made_long_ago else 2.0  # rounds that find nothing first
            fake.script = ["late"] + [500] * 3  # the charge is made; its answer never comes
            response = await book(c, auth, {"event_id": event_id, "seat_ids": seats[:1]})
            assert response.status_code == 503, response.text
            booking_id = response.json()["error"]["details"]["booking_id"]
            assert len(fake.intents) == 1  # money was taken
            if made_long_ago:
                await app.state.db.execute(
                    "UPDATE bookings SET created_at = now() - interval '1 hour' WHERE id = $1",
                    booking_id,
                )
            deadline = time.monotonic() + 20
            while not fake.refunds:
                assert time.monotonic() < deadline, "the charge was never refunded"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.2)
            row = await app.state.db.fetchrow(
                "SELECT saga_state, payment_status, payment_unsettled FROM bookings WHERE id = $1",
                booking_id,
            )
            assert row["saga_state"] == "FAILED"
            assert row["payment_status"] == "refunded" and not row["payment_unsettled"]
            assert len(fake.refunds) == 1


async def test_twenty_failing_cards_do_not_slow_anyone_else(settings):
    """tok_processingError is the buyer's card failing, not the provider: twenty of them among
    forty ordinary buyers leave the breaker closed and every ordinary booking confirmed."""
    async with running(settings) as (app, c):
        event_id, seats, _, _ = await published_event(c, rows=6, per_row=10)
        buyers = [await buyer(c) for _ in range(60)]
        tokens = ["tok_processingError"] * 20 + ["tok_visa"] * 40
        answers = await asyncio.gather(
            *(
                c.post(
                    "/bookings",
                    json={
                        "event_id": event_id,
                        "seat_ids": [seats[n]],
                        "payment": {"method": "card", "token": token},
                    },
                    headers={**auth, "Idempotency-Key": uuid.uuid4().hex, "Prefer": "wait=20"},
                )
                for n, (auth, token) in enumerate(zip(buyers, tokens, strict=True))
            )
        )
        failing, ordinary = answers[:20], answers[20:]
        assert [a.status_code for a in ordinary] == [201] * 40
        assert {a.json()["error"]["details"]["decline_code"] for a in failing} == {
            "processing_error"
        }
        assert app.state.payments.breaker.state == 0  # closed


@pytest.mark.slow
async def test_an_instance_killed_between_the_cancel_and_its_refund(spawn_server, redis):
    """kill -9 of the instance while the refund call is under way (the cancel has committed):
    another instance's refund worker makes the refund, once."""
    env = {
        "BILTEN_TEST_PAYMENT_LATENCY_MS": "1500",
        "BILTEN_PAYMENT_TIMEOUT": "2",
        "BILTEN_PAYMENT_RETRIES": "0",
        "BILTEN_LIMIT_REGISTER_IP": "0/60",
        "BILTEN_LIMIT_API_IP": "0/60",
        "BILTEN_ARGON2_MEMORY_KIB": "1024",
        "BILTEN_ARGON2_TIME_COST": "1",
    }
    a = spawn_server(**env)
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
        event_id, seats, _, _ = await published_event(on_a)
        email = f"kill-{uuid.uuid4().hex[:8]}@x.com"
        registered = await on_a.post(
            "/auth/register", json={"email": email, "password": PASSWORD, "name": email}
        )
        auth = {"Authorization": f"Bearer {registered.json()['access_token']}"}
        booking = (await book(on_a, auth, {"event_id": event_id, "seat_ids": seats[:1]})).json()[
            "booking"
        ]
        cancel = asyncio.ensure_future(on_a.post(f"/bookings/{booking['id']}/cancel", headers=auth))
        await asyncio.sleep(0.7)  # committed; the refund call sleeps 1.5 s in the provider
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()
        try:
            answer = await cancel
        except httpx.HTTPError:
            pass  # killed while the cancel made the refund call
        else:
            # The refund worker claimed the refund first: the cancel answered without making
            # the call, which the kill then cut short all the same.
            assert answer.status_code == 200, answer.text
            assert answer.json()["payment"]["status"] == "refunding", answer.text
    b = spawn_server(**env)
    async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
        deadline = time.monotonic() + 30
        while (found := (await on_b.get(f"/bookings/{booking['id']}", headers=auth)).json())[
            "payment"
        ]["status"] != "refunded":
            assert found["status"] == "cancelled" and found["payment"]["status"] == "refunding"
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.3)
    money = await ledger(redis, booking["id"])
    assert money["status"] == "refunded" and money["refund_id"]  # one ledger entry, refunded


async def test_a_charge_that_is_not_the_bookings_amount_confirms_nothing(settings, redis):
    """A provider answer that took another amount (a bug, a tampered webhook): the booking
    fails, its seats go back, and what was taken is refunded."""
    from bilten.sagas import batch
    from bilten.sagas.finish import finish
    from tests.test_bookings import queued

    async with running(settings.replace(roles=frozenset({"api"}))) as (app, c):
        event_id, seats, _, _ = await published_event(c)
        auth = await buyer(c)
        answer = await book(c, auth, {"event_id": event_id, "seat_ids": seats[:1]}, headers={})
        booking_id = answer.json()["request_id"]
        await batch.begin_batch(app.state, await queued(app.state, event_id))  # reserved
        wrong = await app.state.payments.charge(
            key=booking_id, amount_cents=1, currency="EUR", token="tok_visa"
        )
        outcome = (await finish(app.state, {booking_id: wrong}))[booking_id]
        assert outcome.state == "FAILED"
        assert outcome.error.details["decline_code"] == "charge_mismatch"
        found = (await c.get(f"/bookings/{booking_id}", headers=auth)).json()
        assert found["status"] == "failed" and found["payment"]["status"] == "refunded"
        assert (await ledger(redis, booking_id))["status"] == "refunded"
        map_ = (await c.get(f"/events/{event_id}/seats")).json()["seats"]
        assert next(s["status"] for s in map_ if s["id"] == seats[0]) == "available"


async def test_a_refund_the_provider_refuses_is_dead_and_shown(client, database_url):
    """Given up at once when the provider refuses it (here: a payment it does not know), and
    visible to the organizer and in the metrics, with the reason kept."""
    from prometheus_client import REGISTRY

    event_id, seats, _, organizer = await published_event(client)
    auth = await buyer(client)
    booking = (await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]})).json()[
        "booking"
    ]
    conn = await db.connect(database_url)
    try:
        await conn.execute(
            "UPDATE bookings SET payment_id = 'tpay_unknown' WHERE id = $1", booking["id"]
        )
        cancelled = await client.post(f"/bookings/{booking['id']}/cancel", headers=auth)
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["payment"]["status"] == "refunding"
        row = await conn.fetchrow(
            "SELECT status, last_error FROM refunds WHERE booking_id = $1", booking["id"]
        )
    finally:
        await conn.close()
    assert row["status"] == "dead" and "no_such_payment" in row["last_error"]
    stats = (await client.get(f"/events/{event_id}/stats", headers=organizer)).json()
    assert stats["refunds"]["dead"] == 1 and stats["refunds"]["count"] == 0
    from bilten import refunds

    assert refunds.MAX_ATTEMPTS > 1
    dead = REGISTRY.get_sample_value("bilten_refunds_total", {"outcome": "dead"})
    assert dead is not None and dead >= 1


async def refunded_booking(c):
    """A booking of one seat, confirmed, then cancelled by its buyer and refunded; and the
    buyer's headers."""
    event_id, seats, _, _ = await published_event(c)
    auth = await buyer(c)
    booking = (await book(c, auth, {"event_id": event_id, "seat_ids": seats[:1]})).json()["booking"]
    cancelled = await c.post(f"/bookings/{booking['id']}/cancel", headers=auth)
    assert cancelled.json()["payment"]["status"] == "refunded", cancelled.text
    return booking, auth


async def test_a_refund_made_meanwhile_is_never_marked_dead(settings):
    """A worker giving a refund up after another one (or a webhook) saw it through leaves it
    refunded: the row must not say the money is still owed."""
    from bilten import refunds

    async with running(settings) as (app, c):
        booking, _ = await refunded_booking(c)
        await refunds._give_up(app.state, booking["id"], "a late worker's error")
        row = await app.state.db.fetchrow(
            "SELECT status, last_error FROM refunds WHERE booking_id = $1", booking["id"]
        )
    assert row["status"] == "refunded" and row["last_error"] != "a late worker's error"


async def test_a_refund_that_fails_after_it_was_confirmed_is_made_again(settings):
    """Stripe confirms a refund, then reports it failed (the card's account closed, say): the
    booking's refund is due again and made anew, under a key of its own (the first key would
    only replay the failed refund); the same news again changes nothing."""
    from bilten import refunds
    from bilten.payments import webhooks
    from bilten.sagas import booking as saga

    async with FakeStripe() as fake, running(on_fake_stripe(settings, fake, 1.0)) as (app, c):
        booking, auth = await refunded_booking(c)
        [first] = fake.refunds
        first["status"] = "failed"  # days later, at the provider
        fake.intents[0]["latest_charge"]["refunded"] = False
        news = webhooks.EventObject(
            id=first["id"], status="failed", metadata=webhooks.Metadata(booking_id=booking["id"])
        )
        await saga.apply_webhook(app.state, "charge.refund.updated", news)
        found = (await c.get(f"/bookings/{booking['id']}", headers=auth)).json()
        assert found["payment"]["status"] == "refunding"
        assert await refunds.run(app.state, [booking["id"]]) == 1
        assert [r["status"] for r in fake.refunds] == ["failed", "succeeded"]
        keys_used = [
            r.headers["idempotency-key"]
            for r in fake.requests
            if (r.method, r.path) == ("POST", "/v1/refunds")
        ]
        assert keys_used == [f"refund-{booking['id']}", f"refund-{booking['id']}-1"]
        found = (await c.get(f"/bookings/{booking['id']}", headers=auth)).json()
        assert found["payment"]["status"] == "refunded"
        await saga.apply_webhook(app.state, "charge.refund.updated", news)  # told again
        assert await refunds.run(app.state, [booking["id"]]) == 0
        assert len(fake.refunds) == 2


async def test_an_event_cancelled_while_its_bookings_pay_confirms_none_of_them(settings, redis):
    """The organizer cancels while a booking's charge is under way: the booking is not
    confirmed after the cancel (no tickets, no confirmation); it fails and its charge is
    refunded, and its seats are free again."""
    async with running(settings.replace(test_payment_latency_ms=1500)) as (app, c):
        event_id, seats, _, organizer = await published_event(c)
        auth = await buyer(c)
        booking = asyncio.create_task(book(c, auth, {"event_id": event_id, "seat_ids": seats[:2]}))
        await asyncio.sleep(0.7)  # reserved, its charge under way
        cancelled = await c.post(f"/events/{event_id}/cancel", headers=organizer)
        assert cancelled.status_code == 200, cancelled.text
        answer = await booking
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "conflict"
        booking_id = answer.json()["error"]["details"]["booking_id"]
        deadline = time.monotonic() + 10
        while (await ledger(redis, booking_id)).get("status") != "refunded":
            assert time.monotonic() < deadline, await ledger(redis, booking_id)
            await asyncio.sleep(0.1)
        row = await app.state.db.fetchrow(
            """SELECT b.saga_state, b.payment_status, r.reason,
                      (SELECT count(*) FROM tickets t WHERE t.booking_id = b.id) AS tickets,
                      b.history::text AS history
               FROM bookings b JOIN refunds r ON r.booking_id = b.id WHERE b.id = $1""",
            booking_id,
        )
        assert (row["saga_state"], row["payment_status"], row["reason"]) == (
            "FAILED",
            "refunded",
            "event_cancelled",
        )
        assert row["tickets"] == 0 and "CONFIRMED" not in row["history"]
        statuses = await app.state.db.fetch(
            "SELECT status FROM event_seats WHERE event_id = $1 AND seat_id = ANY ($2::uuid[])",
            event_id,
            seats[:2],
        )
        assert [s["status"] for s in statuses] == ["available"] * 2


async def test_the_bookings_of_a_cancelled_event_are_cancelled_side_by_side(settings):
    """Each cancel waits on its refund's provider call: a cancelled event's bookings are
    cancelled several at a time, every one of them refunded once."""
    async with running(settings.replace(roles=frozenset({"api", "workers"}))) as (_, c):
        event_id, seats, _, organizer = await published_event(c, rows=2, per_row=10)
        bookings = []
        for n in range(12):
            auth = await buyer(c)
            answer = await book(c, auth, {"event_id": event_id, "seat_ids": seats[n : n + 1]})
            assert answer.status_code == 201, answer.text
            bookings.append(answer.json()["booking"]["id"])
    # An instance without workers: no recovery round of its own runs beside the one here.
    async with running(settings.replace(roles=frozenset({"api"}))) as (app, c):
        provider = app.state.payments
        real = provider.refund
        at_once = [0, 0]  # now, most

        async def slow_refund(**kwargs):
            at_once[0] += 1
            at_once[1] = max(at_once[1], at_once[0])
            try:
                await asyncio.sleep(0.2)
                return await real(**kwargs)
            finally:
                at_once[0] -= 1

        provider.refund = slow_refund
        cancelled = await c.post(f"/events/{event_id}/cancel", headers=organizer)
        assert cancelled.status_code == 200
        await app.state.db.execute(  # claimable at once
            "UPDATE bookings SET updated_at = now() - interval '1 minute' WHERE event_id = $1",
            event_id,
        )
        assert await recovery.cancel_for_cancelled_events(app.state) == 12
        rows = await app.state.db.fetch(
            "SELECT saga_state, payment_status FROM bookings WHERE id = ANY ($1::uuid[])", bookings
        )
    assert {(r["saga_state"], r["payment_status"]) for r in rows} == {("CANCELLED", "refunded")}
    assert at_once[1] > 1
