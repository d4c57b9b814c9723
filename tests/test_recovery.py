"""Crashes in the middle of a sale: a killed instance loses no accepted request."""

import asyncio
import signal
import time
import uuid

import httpx
import pytest

from bilten import db
from tests.test_bookings import published_event

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"


async def register(http, url, email, role="attendee"):
    response = await http.post(
        f"{url}/auth/register",
        json={"email": email, "password": PASSWORD, "name": email, "role": role},
    )
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def test_killing_an_instance_mid_sale_loses_nothing(spawn_server, settings, database_url):
    env = {
        "BILTEN_TEST_PAYMENT_LATENCY_MS": "1500",  # the kill lands while A charges
        "BILTEN_QUEUE_LEASE_MS": "1000",
        "BILTEN_HOLD_TTL": "30",
        "BILTEN_BOOKING_WORKERS": "2",
        "BILTEN_LIMIT_REGISTER_IP": "0/60",
        "BILTEN_LIMIT_API_IP": "0/60",
        "BILTEN_ARGON2_MEMORY_KIB": "1024",
        "BILTEN_ARGON2_TIME_COST": "1",
    }
    a = spawn_server(**env)
    b = spawn_server(**env)
    async with httpx.AsyncClient(timeout=30) as http:
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
            event_id, seats, _, _ = await published_event(on_a, rows=1, per_row=20)
        buyers = await asyncio.gather(
            *(register(http, a.url, f"crash-{uuid.uuid4().hex[:8]}@x.com") for _ in range(30))
        )
        # 30 requests for 20 seats at instance A: one per seat is accepted (202), the others are
        # refused at the door, as the seat is claimed by a queued request.
        responses = await asyncio.gather(
            *(
                http.post(
                    f"{a.url}/bookings",
                    headers={**auth, "Idempotency-Key": f"k{i}"},
                    json={
                        "event_id": event_id,
                        "seat_ids": [seats[i % 20]],
                        "payment": {"method": "card", "token": "tok_visa"},
                    },
                )
                for i, auth in enumerate(buyers)
            )
        )
        codes = sorted(r.status_code for r in responses)
        assert codes == [202] * 20 + [409] * 10, [r.text for r in responses]
        accepted = [r.json()["request_id"] for r in responses if r.status_code == 202]
    await asyncio.sleep(0.2)  # A is in the middle of the sale now
    a.process.send_signal(signal.SIGKILL)
    a.process.wait(10)

    conn = await db.connect(database_url)
    try:
        finished = await conn.fetchval(
            "SELECT count(*) FROM bookings WHERE id = ANY ($1::uuid[]) "
            "AND saga_state IN ('CONFIRMED', 'FAILED')",
            accepted,
        )
        assert finished < len(accepted), "the crash came after the sale: nothing to recover"
        deadline = time.monotonic() + 60
        while True:
            states = await conn.fetch(
                "SELECT saga_state, count(*) FROM bookings WHERE id = ANY ($1::uuid[]) "
                "GROUP BY saga_state",
                accepted,
            )
            counts = {r["saga_state"]: r["count"] for r in states}
            if set(counts) <= {"CONFIRMED", "FAILED"} and sum(counts.values()) == len(accepted):
                break
            assert time.monotonic() < deadline, f"unfinished after the crash: {counts}\n{b.log}"
            await asyncio.sleep(0.2)
        assert counts.get("CONFIRMED") == 20, counts
        sold = await conn.fetchval(
            "SELECT count(*) FROM event_seats WHERE event_id = $1 AND status = 'sold'", event_id
        )
        assert sold == 20
        # Each sold to a confirmed booking (a booking holds its seats itself while it pays).
        strays = await conn.fetchval(
            """SELECT count(*) FROM event_seats es LEFT JOIN bookings b ON b.id = es.booking_id
               WHERE es.event_id = $1 AND es.status = 'sold'
                 AND b.saga_state IS DISTINCT FROM 'CONFIRMED'""",
            event_id,
        )
        assert strays == 0
        twice = await conn.fetchval(
            """SELECT count(*) FROM (
                   SELECT seat_id FROM tickets WHERE event_id = $1 AND status <> 'void'
                   GROUP BY seat_id HAVING count(*) > 1) t""",
            event_id,
        )
        assert twice == 0
        stale = await conn.fetchval(
            "SELECT count(*) FROM event_seats WHERE event_id = $1 AND status = 'held' "
            "AND hold_expires_at < now()",
            event_id,
        )
        assert stale == 0
        unpaid = await conn.fetchval(
            "SELECT count(*) FROM bookings WHERE saga_state = 'CONFIRMED' "
            "AND payment_status <> 'succeeded'"
        )
        assert unpaid == 0
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "changes",
    [{}, {"payment_outage_wait": 600.0}, {"payment_timeout": 30.0, "payment_retries": 5}],
)
def test_a_booked_holds_seats_outlast_its_charging_and_recoverys_takeover(settings, changes):
    """A hold's seats stay held past the longest charging and past the moment recovery takes
    a stopped booking over, whatever the payment settings."""
    from types import SimpleNamespace

    from bilten.sagas import recovery, steps

    tuned = settings.replace(**changes)
    window = steps.payment_window(tuned)
    assert window > steps.charging_time(tuned)
    assert window > recovery.stale_payment(SimpleNamespace(settings=tuned))
