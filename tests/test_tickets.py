"""Tickets, check-in, booking mail (against a real SMTP server) and organizer analytics."""

import asyncio
import base64
import email
import email.policy
import logging

import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from httpx import ASGITransport, AsyncClient

from bilten import db
from bilten.app import create_app
from tests.catalog_helpers import register
from tests.conftest import truncate
from tests.smtp import Inbox, smtp_server
from tests.test_bookings import book, buyer, published_event


@pytest.fixture(autouse=True)
async def clean(database_url, redis):
    await truncate(database_url, "users", "outbox", "mail_jobs")


@pytest.fixture
async def mailed(settings):
    """A client over an app whose mail goes to a real SMTP server, and that server's inbox."""
    inbox = Inbox()
    async with smtp_server(inbox) as port:
        live = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}", mail_poll_interval=0.05)
        async with LifespanManager(create_app(live)) as manager:
            async with AsyncClient(
                transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
            ) as client:
                yield client, inbox


def unpad(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def confirmed(client, seats=2):
    event_id, seat_ids, standing, organizer = await published_event(client)
    auth = await buyer(client)
    response = await book(client, auth, {"event_id": event_id, "seat_ids": seat_ids[:seats]})
    assert response.status_code == 201, response.text
    return event_id, response.json()["booking"], auth, organizer, standing


async def test_tickets_are_listed_visible_and_verifiable_offline(client):
    event_id, booking, auth, organizer, _ = await confirmed(client)
    mine = (await client.get("/tickets", headers=auth)).json()
    assert {t["id"] for t in mine["items"]} == {t["id"] for t in booking["tickets"]}
    ticket = mine["items"][0]
    assert ticket["status"] == "valid" and ticket["event_id"] == event_id
    assert (await client.get(f"/tickets/{ticket['id']}", headers=auth)).json() == ticket
    assert (await client.get(f"/tickets/{ticket['id']}", headers=organizer)).status_code == 200
    stranger = await buyer(client)
    assert (await client.get(f"/tickets/{ticket['id']}", headers=stranger)).status_code == 404
    qr = await client.get(f"/tickets/{ticket['id']}/qr.svg", headers=auth)
    assert qr.status_code == 200 and qr.headers["content-type"] == "image/svg+xml"
    assert qr.text.lstrip().startswith("<svg")
    # A scanner verifies the code with the event's public key alone.
    key = (await client.get(f"/events/{event_id}/ticket-key")).json()
    assert key["algorithm"] == "Ed25519"
    raw = unpad(ticket["code"])
    assert raw[:16].hex() == ticket["id"].replace("-", "")
    assert raw[16:32].hex() == event_id.replace("-", "")
    Ed25519PublicKey.from_public_bytes(unpad(key["public_key"])).verify(raw[32:], raw[:32])


async def test_check_in_once_then_409_forged_404_buyer_403(client):
    _, booking, auth, organizer, _ = await confirmed(client)
    code = booking["tickets"][0]["code"]
    buyer_try = await client.post("/tickets/check-in", headers=auth, json={"code": code})
    assert buyer_try.status_code == 403
    first = await client.post("/tickets/check-in", headers=organizer, json={"code": code})
    assert first.status_code == 200, first.text
    assert first.json()["ticket"]["status"] == "checked_in"
    second = await client.post("/tickets/check-in", headers=organizer, json={"code": code})
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "already_checked_in"
    assert second.json()["error"]["details"]["checked_in_at"].startswith(
        first.json()["checked_in_at"][:19]
    )
    # Characters added, padding, the other base64 alphabet: not a code this server wrote,
    # although a lenient decoder would read the same bytes from them (checked in the ticket
    # above, they would answer 409).
    altered = [code + "!!!", code[:10] + "..." + code[10:], code + "=="]
    altered.append(code.replace("-", "+").replace("_", "/") if "-" in code or "_" in code else "")
    for odd in altered:
        response = await client.post("/tickets/check-in", headers=organizer, json={"code": odd})
        assert response.status_code in (404, 422), (odd, response.text)
    # One changed character anywhere breaks the signature.
    for position in (0, 40, len(code) - 2):
        swapped = "A" if code[position] != "A" else "B"
        forged = code[:position] + swapped + code[position + 1 :]
        response = await client.post("/tickets/check-in", headers=organizer, json={"code": forged})
        assert response.status_code == 404, position
    other = (await register(client, "other-org@example.com", "organizer"))[0]
    foreign = await client.post(
        "/tickets/check-in", headers=other, json={"code": booking["tickets"][1]["code"]}
    )
    assert foreign.status_code == 403


async def test_concurrent_scans_check_in_once(client):
    _, booking, _, organizer, _ = await confirmed(client, seats=1)
    code = booking["tickets"][0]["code"]
    responses = await asyncio.gather(
        *(
            client.post("/tickets/check-in", headers=organizer, json={"code": code})
            for _ in range(8)
        )
    )
    assert sorted(r.status_code for r in responses) == [200] + [409] * 7


async def test_tickets_of_a_cancelled_booking_are_void(client):
    _, booking, auth, organizer, _ = await confirmed(client)
    await client.post(f"/bookings/{booking['id']}/cancel", headers=auth)
    ticket = (await client.get(f"/tickets/{booking['tickets'][0]['id']}", headers=auth)).json()
    assert ticket["status"] == "void"
    response = await client.post(
        "/tickets/check-in", headers=organizer, json={"code": booking["tickets"][0]["code"]}
    )
    assert response.status_code == 404


async def arrived(inbox, word, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if any(word in m["Subject"].lower() for m in inbox.messages):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no mail about {word!r} arrived")


async def next_mail(inbox, count, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if len(inbox.messages) >= count:
            return inbox.messages[count - 1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"mail {count} did not arrive; {len(inbox.messages)} did")


async def test_one_confirmation_and_one_cancellation_mail(mailed, settings):
    client, inbox = mailed
    _, booking, auth, _, _ = await confirmed(client)
    # The registration mails come first; count the booking mails by subject.
    await arrived(inbox, "tickets")
    confirmations = [m for m in inbox.messages if "tickets" in m["Subject"].lower()]
    assert len(confirmations) == 1
    message = confirmations[0]
    text = message.get_body(preferencelist=("plain",)).get_content()
    for ticket in booking["tickets"]:
        assert ticket["code"] in text and ticket["label"] in text
    assert "90.00 EUR" in text
    images = [p for p in message.walk() if p.get_content_type() == "image/png"]
    assert len(images) == len(booking["tickets"])
    assert all(p.get_content().startswith(b"\x89PNG") for p in images)
    # Redelivery of the outbox or the notice changes nothing: one mail per booking and kind.
    from bilten import notifications

    conn = await db.connect(settings.database_url)
    try:
        user_id = await conn.fetchval(
            "SELECT user_id::text FROM bookings WHERE id = $1", booking["id"]
        )
        await notifications.booking_changed(conn, "booking_confirmed", booking["id"], user_id)
    finally:
        await conn.close()
    cancel = await client.post(f"/bookings/{booking['id']}/cancel", headers=auth)
    assert cancel.status_code == 200
    await arrived(inbox, "cancelled")
    await asyncio.sleep(0.3)  # room for a duplicate to show up, were there one
    subjects = [m["Subject"] for m in inbox.messages]
    assert sum("tickets" in s.lower() for s in subjects) == 1
    assert sum("cancelled" in s.lower() for s in subjects) == 1
    cancellation = next(m for m in inbox.messages if "cancelled" in m["Subject"].lower())
    assert "refunded" in cancellation.get_body(preferencelist=("plain",)).get_content()


async def test_a_phone_number_adds_an_sms(client, caplog):
    caplog.set_level(logging.INFO, logger="bilten.notifications")
    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    await client.patch("/users/me/profile", headers=auth, json={"phone": "+4791234567"})
    response = await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]})
    assert response.status_code == 201
    for _ in range(200):
        sms = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SMS to")]
        if sms:
            break
        await asyncio.sleep(0.02)
    assert len(sms) == 1 and "+4791234567" in sms[0] and "confirmed" in sms[0]
    assert "/#/tickets" in sms[0]  # a link to the tickets, not a picture


async def test_an_sms_notice_draws_no_qr_codes(client, settings):
    from bilten import db, notifications

    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    response = await book(client, auth, {"event_id": event_id, "seat_ids": seats[:2]})
    booking_id = response.json()["booking"]["id"]
    pool = await db.create_pool(settings)
    try:
        context = {"booking_id": booking_id}
        _, none = await notifications.prepare(pool, "booking_confirmed", context, images=False)
        full, codes = await notifications.prepare(pool, "booking_confirmed", context)
    finally:
        await pool.close()
    assert none == {}
    assert len(codes) == 2
    sent = notifications.compose("a@b.c", "booking_confirmed", "c@d.e", full, "k", codes)
    message = email.message_from_bytes(sent.data, policy=email.policy.default)
    drawn = [p.get_content() for p in message.walk() if p.get_content_type() == "image/png"]
    assert len(drawn) == 2 and all(png.startswith(b"\x89PNG") for png in drawn)


async def test_stats_add_up(client):
    event_id, seats, standing, organizer = await published_event(client)
    ann, bob = await buyer(client), await buyer(client)
    first = (await book(client, ann, {"event_id": event_id, "seat_ids": seats[:2]})).json()
    second = await book(
        client, bob, {"event_id": event_id, "ticket_type_id": standing, "quantity": 3}
    )
    assert second.status_code == 201
    await client.post(
        "/tickets/check-in",
        headers=organizer,
        json={"code": first["booking"]["tickets"][0]["code"]},
    )
    stats = (await client.get(f"/events/{event_id}/stats", headers=organizer)).json()
    assert stats["tickets_sold"] == 5
    assert stats["revenue_cents"] == 2 * 4500 + 3 * 1500
    assert stats["currency"] == "EUR"
    assert stats["checked_in"] == 1
    assert {(t["tier"], t["tickets"], t["revenue_cents"]) for t in stats["by_tier"]} == {
        ("Main", 2, 9000),
        ("Standing", 3, 4500),
    }
    assert sum(m["tickets"] for m in stats["sales_per_minute"]) == 5
    other = (await register(client, "rival@example.com", "organizer"))[0]
    assert (await client.get(f"/events/{event_id}/stats", headers=other)).status_code == 403
    assert (await client.get(f"/events/{event_id}/stats", headers=ann)).status_code == 403
    # A booking whose ticket was used cannot be cancelled; a cancelled one leaves the figures.
    used = await client.post(f"/bookings/{first['booking']['id']}/cancel", headers=ann)
    assert used.status_code == 409
    assert used.json()["error"]["details"]["reason"] == "checked_in"
    cancelled = await client.post(f"/bookings/{second.json()['booking']['id']}/cancel", headers=bob)
    assert cancelled.status_code == 200, cancelled.text
    stats = (await client.get(f"/events/{event_id}/stats", headers=organizer)).json()
    assert stats["tickets_sold"] == 2 and stats["revenue_cents"] == 9000


async def test_business_metrics(client):
    _, booking, _, organizer, _ = await confirmed(client, seats=1)
    await client.post(
        "/tickets/check-in", headers=organizer, json={"code": booking["tickets"][0]["code"]}
    )
    text = (await client.get("/metrics")).text
    for name in (
        "bilten_bookings_total",
        "bilten_saga_duration_seconds_bucket",
        "bilten_booking_queue_depth",
        "bilten_check_ins_total",
        "bilten_mail_sent_total",
    ):
        assert name in text, name


async def test_ticket_and_booking_lists_page_by_cursor(client):
    event_id, booking, auth, _, standing = await confirmed(client)
    second = await book(
        client, auth, {"event_id": event_id, "ticket_type_id": standing, "quantity": 1}
    )
    assert second.status_code == 201
    seen, cursor = [], None
    while True:
        page = (
            await client.get(
                "/tickets",
                headers=auth,
                params={"limit": 1, **({"cursor": cursor} if cursor else {})},
            )
        ).json()
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 3
    bookings_seen, cursor = [], None
    while True:
        page = (
            await client.get(
                "/bookings",
                headers=auth,
                params={"limit": 1, **({"cursor": cursor} if cursor else {})},
            )
        ).json()
        bookings_seen += [b["id"] for b in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert bookings_seen == [second.json()["booking"]["id"], booking["id"]]  # newest first
    for url in ("/tickets", "/bookings"):
        bad = await client.get(url, headers=auth, params={"cursor": "bm90IGEgY3Vyc29y"})
        assert bad.status_code == 422
        assert bad.json()["error"]["details"]["fields"][0]["field"] == "cursor"


async def test_signing_keys_are_sealed_at_rest_and_survive_a_key_rotation(
    client, settings, database_url
):
    """A database backup holds no usable signing key; a key kept in plaintext by an older
    version, or sealed under a retired data key, still signs the same, and is sealed again
    under the current key when it is read."""
    from bilten import db, sealing, ticketcodes

    event_id, seats, _, _ = await published_event(client)
    auth = await buyer(client)
    booked = (await book(client, auth, {"event_id": event_id, "seat_ids": seats[:1]})).json()
    code = booked["booking"]["tickets"][0]["code"]
    conn = await db.connect(database_url)
    try:
        stored = bytes(
            await conn.fetchval("SELECT private_key FROM event_keys WHERE event_id = $1", event_id)
        )
        public = bytes(
            await conn.fetchval("SELECT public_key FROM event_keys WHERE event_id = $1", event_id)
        )
        assert stored.startswith(sealing.MARKER) and len(stored) > 32
        current = sealing.keyring(settings)
        raw, stale = current.open(stored)
        assert not stale and raw not in stored  # the key itself is nowhere in the row
        assert ticketcodes.verify(public, ticketcodes.parse(code))
        # As an older version kept it: plaintext. Read with a rotated keyring (a new data key,
        # the secret key kept to open what it sealed).
        await conn.execute(
            "UPDATE event_keys SET private_key = $2 WHERE event_id = $1", event_id, raw
        )
        rotated = sealing.keyring(
            settings.replace(
                data_key="new data key " + "n" * 32, old_data_keys=(settings.secret_key,)
            )
        )
        key = await ticketcodes.private_key(conn, rotated, event_id)
        assert key.private_bytes_raw() == raw
        resealed = bytes(
            await conn.fetchval("SELECT private_key FROM event_keys WHERE event_id = $1", event_id)
        )
        assert resealed.startswith(sealing.MARKER + rotated.current)
        assert rotated.open(resealed) == (raw, False)
    finally:
        await conn.close()


async def test_sealing_round_trip_and_rotation():
    from bilten import sealing
    from bilten.settings import Settings

    old = Settings(secret_key="s" * 40, data_key="old data key " + "o" * 32)
    new = old.replace(data_key="new data key " + "n" * 32, old_data_keys=(old.data_key,))
    secret = b"\x01" * 32
    sealed_old = sealing.keyring(old).seal(secret)
    assert secret not in sealed_old and sealed_old.startswith(sealing.MARKER)
    assert sealing.keyring(old).open(sealed_old) == (secret, False)
    assert sealing.keyring(new).open(sealed_old) == (secret, True)  # to be sealed again
    assert sealing.keyring(new).open(secret) == (secret, True)  # plaintext from before
    with pytest.raises(sealing.Unsealable):
        sealing.keyring(new.replace(old_data_keys=())).open(sealed_old)
    tampered = sealed_old[:-1] + bytes([sealed_old[-1] ^ 1])
    with pytest.raises(Exception):  # noqa: B017 (cryptography's InvalidTag)
        sealing.keyring(old).open(tampered)


async def test_a_data_key_set_for_the_first_time_still_opens_what_the_secret_key_sealed():
    from bilten import sealing
    from bilten.settings import Settings

    before = Settings(secret_key="s" * 40)
    sealed = sealing.keyring(before).seal(b"k" * 32)
    after = before.replace(data_key="a new data key " + "d" * 32)
    assert sealing.keyring(after).open(sealed) == (b"k" * 32, True)
