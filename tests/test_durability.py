"""A 202 is a promise: accepted booking requests survive the loss of Redis's data."""

import asyncio
import time
import uuid

from bilten import db
from bilten.sagas import batch
from tests.test_bookings import book, buyer, published_event, queued
from tests.test_catalog import running


async def wait_until_final(db, ids, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        rows = await db.fetch(
            "SELECT id::text, saga_state FROM bookings WHERE id = ANY ($1::uuid[])", ids
        )
        states = {r["id"]: r["saga_state"] for r in rows}
        if len(states) == len(ids) and all(
            s in ("CONFIRMED", "FAILED", "CANCELLED") for s in states.values()
        ):
            return states
        if time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.2)


async def confirmed(db, event_id):
    return await db.fetchval(
        "SELECT count(*) FROM bookings WHERE saga_state = 'CONFIRMED' AND event_id = $1", event_id
    )


async def test_a_flush_of_redis_mid_sale_loses_no_accepted_request(settings):
    """Thirty buyers, one seat each (uncontended): ten booked, five reserved and paying, fifteen
    still queued when Redis is flushed. Every one of them ends confirmed, once."""
    async with running(settings.replace(roles=frozenset({"api"}))) as (door, c):
        event_id, seats, _, _ = await published_event(c)
        buyers = [await buyer(c) for _ in range(30)]
        answers = await asyncio.gather(
            *(
                book(c, auth, {"event_id": event_id, "seat_ids": [seats[n]]}, headers={})
                for n, auth in enumerate(buyers)
            )
        )
        assert [a.status_code for a in answers] == [202] * 30
        ids = [a.json()["request_id"] for a in answers]
        entries = await queued(door.state, event_id)
        by_id = {e.request_id: e for e in entries}
        done = await batch.run_batch(door.state, [by_id[i] for i in ids[:10]])
        assert {o.state for o in done} == {"CONFIRMED"}
        await batch.begin_batch(door.state, [by_id[i] for i in ids[10:15]])  # paying
        await door.state.redis.flushdb()  # this test's database only, not a shared server's

        async with running(settings.replace(roles=frozenset({"workers"}))) as (worker, _):
            states = await wait_until_final(worker.state.db, ids)
            assert states == dict.fromkeys(ids, "CONFIRMED")
            sold = await worker.state.db.fetchval(
                "SELECT count(*) FROM event_seats WHERE event_id = $1 AND status = 'sold'",
                event_id,
            )
            tickets = await worker.state.db.fetch(
                "SELECT booking_id::text, count(*) AS n FROM tickets WHERE event_id = $1 "
                "GROUP BY booking_id",
                event_id,
            )
            assert sold == 30
            assert {t["booking_id"]: t["n"] for t in tickets} == dict.fromkeys(ids, 1)
            # Their records go once their outcomes are known.
            deadline = time.monotonic() + 10
            while await worker.state.db.fetchval("SELECT count(*) FROM accepted_requests"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        for auth, request_id in zip(buyers, ids, strict=True):
            status = await c.get(f"/bookings/requests/{request_id}", headers=auth)
            assert status.json()["status"] == "confirmed", status.text


async def test_a_request_is_on_record_before_it_is_answered_and_refusals_are_not(settings):
    async with running(settings.replace(roles=frozenset({"api"}))) as (door, c):
        event_id, seats, _, _ = await published_event(c)
        ann, bob = await buyer(c), await buyer(c)
        answer = await book(c, ann, {"event_id": event_id, "seat_ids": seats[:1]}, headers={})
        assert answer.status_code == 202
        refused = await book(c, bob, {"event_id": event_id, "seat_ids": seats[:1]}, headers={})
        assert refused.status_code == 409
        on_record = await door.state.db.fetch("SELECT id::text FROM accepted_requests")
        assert [r["id"] for r in on_record] == [answer.json()["request_id"]]


async def test_a_waiting_request_is_recorded_only_when_its_wait_ends_in_a_202(settings):
    """``Prefer: wait``: answered with its outcome, a request leaves no record (its booking is
    final in PostgreSQL); when its wait runs out it is recorded before its 202, so a flush of
    Redis during the wait loses it no more than one after a 202."""
    from bilten import keys

    async with running(settings.replace(roles=frozenset({"api"}))) as (door, c):
        event_id, seats, _, _ = await published_event(c)
        ann, bob = await buyer(c), await buyer(c)
        waiting = asyncio.ensure_future(
            book(
                c,
                bob,
                {"event_id": event_id, "seat_ids": seats[1:2]},
                headers={"Prefer": "wait=10"},
            )
        )
        while not (entries := await queued(door.state, event_id)):
            await asyncio.sleep(0.05)
        [outcome] = await batch.run_batch(door.state, entries)
        assert outcome is not None and outcome.state == "CONFIRMED"
        # As a worker announces it (the outcome left out: the door reads it back).
        await door.state.redis.publish(keys.BOOKING_DONE, f"{entries[0].request_id} ")
        won = await waiting
        assert won.status_code == 201, won.text
        recorded = "SELECT id::text FROM accepted_requests WHERE id = ANY ($1::uuid[])"
        assert await door.state.db.fetch(recorded, [won.json()["request_id"]]) == []

        pending = asyncio.ensure_future(
            book(
                c, ann, {"event_id": event_id, "seat_ids": seats[:1]}, headers={"Prefer": "wait=1"}
            )
        )
        while len(entries := await queued(door.state, event_id)) < 2:
            await asyncio.sleep(0.05)
        request_id = entries[1].request_id
        assert await door.state.db.fetch(recorded, [request_id]) == []
        await door.state.redis.flushdb()  # this test's database only, not a shared server's
        answer = await pending
        assert answer.status_code == 202, answer.text
        assert answer.json()["request_id"] == request_id
        assert len(await door.state.db.fetch(recorded, [request_id])) == 1

    async with running(settings) as (instance, _):
        states = await wait_until_final(instance.state.db, [request_id])
        assert states == {request_id: "CONFIRMED"}


async def test_a_request_asked_again_is_made_sure_of_as_the_first_time(settings):
    """The first answer was 503 after the request was queued (PostgreSQL or Redis out of reach
    for what came next): asked again with its key, it is put on record and among the active
    queues before it is answered, so that a later loss of Redis's data cannot lose it."""
    from bilten import keys, queue

    async with running(settings.replace(roles=frozenset({"api"}))) as (door, c):
        event_id, seats, _, _ = await published_event(c)
        ann = await buyer(c)
        body = {"event_id": event_id, "seat_ids": seats[:1]}
        first = await book(c, ann, body, key="again", headers={})
        assert first.status_code == 202
        request_id = first.json()["request_id"]
        # What an outage right after the queueing leaves: no record, the event not active.
        await door.state.db.execute("DELETE FROM accepted_requests")
        await door.state.redis.srem(keys.QUEUE_ACTIVE, event_id)
        again = await book(c, ann, body, key="again", headers={})
        assert again.status_code == 202 and again.json()["request_id"] == request_id
        rows = await door.state.db.fetch("SELECT id::text, request FROM accepted_requests")
        assert [r["id"] for r in rows] == [request_id]
        [entry] = await queued(door.state, event_id)
        assert queue.decode_request(bytes(rows[0]["request"])) == entry.request
        assert await door.state.redis.sismember(keys.QUEUE_ACTIVE, event_id)


async def test_recovery_unclaims_the_seats_of_a_booking_it_fails(settings):
    """A worker died after reserving (its entry gone with it): recovery finishes the booking;
    when that fails, the door's claims on its seats go too, so they sell again at once."""
    from bilten import keys
    from bilten.sagas import recovery

    async with running(settings.replace(roles=frozenset({"api"}))) as (door, c):
        event_id, seats, _, _ = await published_event(c)
        auth = await buyer(c)
        answer = await c.post(
            "/bookings",
            json={
                "event_id": event_id,
                "seat_ids": seats[:2],
                "payment": {"method": "card", "token": "tok_chargeDeclined"},
            },
            headers={**auth, "Idempotency-Key": "declined"},
        )
        assert answer.status_code == 202
        booking_id = answer.json()["request_id"]
        await batch.begin_batch(door.state, await queued(door.state, event_id))
        claims = keys.seat_claims(event_id)
        assert await door.state.redis.hexists(claims, seats[0])
        await door.state.db.execute(
            "UPDATE bookings SET updated_at = now() - interval '5 minutes' WHERE id = $1",
            booking_id,
        )
        assert await recovery.resume_sagas(door.state) == 1
        state = await door.state.db.fetchval(
            "SELECT saga_state FROM bookings WHERE id = $1", booking_id
        )
        assert state == "FAILED"
        assert not await door.state.redis.hexists(claims, seats[0])
        assert not await door.state.redis.hexists(claims, seats[1])


async def test_redis_killed_mid_sale_and_restarted_loses_nothing(settings, tmp_path):
    """kill -9 of Redis (with its append-only file, as production runs it) in the middle of a
    sale, started again two seconds later on the same data: the door answers 503 meanwhile,
    the queue pauses, and every request answered 202 ends confirmed (uncontended), once."""
    import signal

    from bilten import embedded

    folder = tmp_path / "redis"
    proc, url = embedded.start_redis(folder, throwaway=False)
    try:
        # Charges take 200 ms: the kill comes while the first batch is paying.
        own = settings.replace(redis_url=url, payment_outage_wait=30.0, test_payment_latency_ms=200)
        async with running(own) as (instance, c):
            event_id, seats, _, _ = await published_event(c)
            buyers = [await buyer(c) for _ in range(30)]
            first = await asyncio.gather(
                *(
                    book(c, auth, {"event_id": event_id, "seat_ids": [seats[n]]}, headers={})
                    for n, auth in enumerate(buyers[:20])
                )
            )
            assert [a.status_code for a in first] == [202] * 20
            await asyncio.sleep(0.1)
            assert await confirmed(instance.state.db, event_id) < 20  # mid-sale
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            during = await book(
                c, buyers[20], {"event_id": event_id, "seat_ids": [seats[20]]}, headers={}
            )
            assert during.status_code == 503, during.text
            await asyncio.sleep(2)
            proc, _ = embedded.start_redis(folder, throwaway=False)
            later = await asyncio.gather(
                *(
                    book(c, auth, {"event_id": event_id, "seat_ids": [seats[20 + n]]}, headers={})
                    for n, auth in enumerate(buyers[20:])
                )
            )
            assert [a.status_code for a in later] == [202] * 10, [a.text for a in later]
            ids = [a.json()["request_id"] for a in (*first, *later)]
            states = await wait_until_final(instance.state.db, ids, timeout=60)
            assert states == dict.fromkeys(ids, "CONFIRMED")
            tickets = await instance.state.db.fetchval(
                "SELECT count(*) FROM tickets WHERE event_id = $1", event_id
            )
            assert tickets == 30
    finally:
        embedded.stop(embedded.Embedded(processes=[proc]))


async def test_records_of_finished_requests_are_forgotten_a_window_at_a_time(settings):
    """Recovery reads the oldest records a window at a time, steps over a request still
    waiting, and never reads more than its windows in one round."""
    from bilten.sagas import recovery

    async with running(settings) as (_, c):
        event_id, seats, _, _ = await published_event(c)
        for n in range(5):
            answer = await book(c, await buyer(c), {"event_id": event_id, "seat_ids": [seats[n]]})
            assert answer.status_code == 201, answer.text
    conn = await db.connect(settings.database_url)
    try:
        await conn.execute("DELETE FROM accepted_requests")
        await conn.execute(
            """INSERT INTO accepted_requests (id, accepted_at, request)
               SELECT id, created_at, decode('00', 'hex') FROM bookings WHERE event_id = $2
               UNION ALL SELECT $1, now() - interval '1 hour', decode('00', 'hex')""",
            uuid.uuid4(),  # the oldest: a request still waiting, no booking yet
            event_id,
        )
        assert await recovery.forget_finished(conn, window=2, windows=2) == 3
        assert await recovery.forget_finished(conn, window=2, windows=2) == 2
        assert await recovery.forget_finished(conn, window=2, windows=2) == 0
        assert await conn.fetchval("SELECT count(*) FROM accepted_requests") == 1
    finally:
        await conn.close()


async def test_postgres_killed_mid_sale_and_restarted_loses_nothing(settings, tmp_path):
    """kill -9 of PostgreSQL's postmaster in the middle of a sale, started again two seconds
    later on the same data (crash recovery): the door answers 503 meanwhile (a retry with the
    same key finds the request), the queue and the payments pause, and every request ends
    confirmed (uncontended), once, with its tickets."""
    import signal

    from bilten import embedded, migrations

    folder = tmp_path / "pg"
    proc, url, _ = embedded.start_postgres(folder, throwaway=False)
    try:
        conn = await db.connect(url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        # Charges take 200 ms: the kill comes while the first batch is paying.
        own = settings.replace(
            database_url=url, payment_outage_wait=30.0, test_payment_latency_ms=200
        )
        async with running(own) as (instance, c):
            event_id, seats, _, _ = await published_event(c)
            buyers = [await buyer(c) for _ in range(30)]

            async def booking(n, headers):
                body = {"event_id": event_id, "seat_ids": [seats[n]]}
                return await book(c, buyers[n], body, key=f"pg-{n}", headers=headers)

            first = await asyncio.gather(*(booking(n, {}) for n in range(20)))
            assert [a.status_code for a in first] == [202] * 20
            await asyncio.sleep(0.1)
            assert await confirmed(instance.state.db, event_id) < 20  # mid-sale
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            during = await booking(20, {})
            assert during.status_code == 503, during.text
            await asyncio.sleep(2)
            deadline = time.monotonic() + 30
            while True:  # the killed server's backends leave its shared memory soon after it
                try:
                    proc, _, _ = embedded.start_postgres(folder, throwaway=False)
                    break
                except embedded.EmbeddedError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.5)
            # The one answered 503 is asked again with its key; the last ten come after.
            later = await asyncio.gather(
                *(booking(n, {"Prefer": "wait=30"}) for n in range(20, 30))
            )
            assert [a.status_code for a in later] == [201] * 10, [a.text for a in later]
            ids = [a.json()["request_id"] for a in first]
            ids += [a.json()["booking"]["id"] for a in later]
            states = await wait_until_final(instance.state.db, ids, timeout=60)
            assert states == dict.fromkeys(ids, "CONFIRMED")
            sold = await instance.state.db.fetchrow(
                """SELECT count(*) AS tickets, count(DISTINCT seat_id) AS seats
                   FROM tickets WHERE event_id = $1""",
                event_id,
            )
            assert (sold["tickets"], sold["seats"]) == (30, 30)
    finally:
        embedded.stop(embedded.Embedded(processes=[proc]))
