"""The booking saga's states, and the pieces every step shares.

PENDING → PAYMENT_PENDING (seats reserved) → CONFIRMED, else FAILED (CANCELLED after a
confirmation). Every step takes a list of bookings and moves them in a few set-based statements
(``unnest``) inside the caller's transaction, while each booking succeeds or fails on its own:
a queue batch is a list of up to 200, recovery, a webhook or a cancel a list of one. Each step
first locks its bookings (in id order) and leaves alone any that is not in the state it starts
from, so any instance can resume a saga another one left.

The steps: :func:`bilten.sagas.reserve.reserve`, :func:`bilten.sagas.booking.charge_all`,
:func:`bilten.sagas.finish.finish` (confirm, or fail and release), :func:`fail_many`; the lock
order they all follow is written down in ``docs/bookings.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bilten import bookings, metrics, payments
from bilten.db import Connection
from bilten.errors import ApiError
from bilten.settings import Settings

# How long a hold's seats stay held while its booking pays, at the least; see payment_window.
PAYMENT_WINDOW = 120


def charging_time(settings: Settings) -> float:
    """The longest a batch's charging may take: a provider outage waited out, with all of a
    charge's attempts around it."""
    calls = settings.payment_timeout * (settings.payment_retries + 1)
    return settings.payment_outage_wait + 3 * calls


def payment_window(settings: Settings) -> float:
    """How long a booked hold's seats stay held while the booking pays: past the longest
    charging and past the moment recovery takes over a booking whose worker stopped
    (``recovery.stale_payment``), so neither a slow payment nor recovery finds them gone."""
    return max(PAYMENT_WINDOW, charging_time(settings) + 90)


_COLUMNS = """id::text, user_id::text, event_id::text, request, hold_id::text, saga_state,
              total_cents, currency, payment_token, payment_id, payment_provider, payment_status,
              failure_code, failure_message, failure_details, created_at"""


BOOKING = f"SELECT {_COLUMNS} FROM bookings WHERE id = $1"


# Bookings are locked in id order, whichever path locks them.
MANY = f"SELECT {_COLUMNS} FROM bookings WHERE id = ANY ($1::uuid[]) ORDER BY id"


MANY_LOCKED = MANY + " FOR UPDATE"


MANY_UNLESS_LOCKED = MANY + " FOR UPDATE SKIP LOCKED"


@dataclass(frozen=True)
class Outcome:
    booking_id: str
    user_id: str
    event_id: str
    state: str
    error: ApiError | None = None
    booking: bookings.Booking | None = None  # the confirmed booking as the API shows it
    request_id: str = ""  # the queued request, when it is not the booking's own id


PaymentResult = payments.Charge | payments.PaymentDeclined | payments.ProviderUnavailable


@dataclass(frozen=True)
class Payable:
    amount_cents: int
    currency: str
    token: str


def result_message(booking_id: str, status: str, error: ApiError | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "booking.result",
        "request_id": booking_id,
        "booking_id": booking_id,
        "status": status,
    }
    if error is not None:
        message["error"] = {"code": error.code, "message": error.message, "details": error.details}
    return message


# → FAILED: the bookings (their history step included) and their buyers' messages in one
# statement.
_FAILED = """
WITH f AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::bool[],
                         $7::jsonb[])
        AS f(id, src, code, message, details, unsettled, note)),
moved AS (
    UPDATE bookings b SET saga_state = 'FAILED', updated_at = now(), payment_token = '',
           failure_code = f.code, failure_message = f.message, failure_details = f.details,
           payment_status = 'failed', payment_unsettled = b.payment_unsettled OR f.unsettled,
           history = b.history || jsonb_build_object(
               'from', f.src, 'to', 'FAILED', 'reason', f.code, 'at', now())
    FROM f WHERE b.id = ANY ($1::uuid[]) AND b.id = f.id
    RETURNING b.id)
INSERT INTO outbox (topic, payload)
SELECT 'users', jsonb_agg(f.note) FROM f JOIN moved USING (id) HAVING count(*) > 0
"""


async def fail_many(
    conn: Connection, failed: list[tuple[Any, ApiError]], *, unsettled: bool = False
) -> list[Outcome]:
    if not failed:
        return []
    await conn.execute(
        _FAILED,
        [row["id"] for row, _ in failed],
        [row["saga_state"] for row, _ in failed],
        [e.code for _, e in failed],
        [e.message for _, e in failed],
        [e.details or {} for _, e in failed],
        [unsettled] * len(failed),
        [
            {"user_id": row["user_id"], "message": result_message(row["id"], "failed", e)}
            for row, e in failed
        ],
    )
    for _, error in failed:
        metrics.BOOKINGS.labels("failed", error.code).inc()
    return [Outcome(row["id"], row["user_id"], row["event_id"], "FAILED", e) for row, e in failed]


async def lock_types(conn: Connection, type_ids: list[str]) -> None:
    """Lock ticket types in id order."""
    ids = sorted(set(type_ids))
    if ids:
        await conn.execute(
            "SELECT 1 FROM ticket_types WHERE id = ANY ($1::uuid[]) ORDER BY id FOR UPDATE", ids
        )


def outcome_of(row: Any) -> Outcome:
    """A booking row (of ``BOOKING``) as an outcome, with its failure when it failed."""
    error = None
    if row["saga_state"] == "FAILED" and row["failure_code"]:
        details = row["failure_details"] or {}
        error = ApiError(row["failure_code"], row["failure_message"] or "", details)
    return Outcome(row["id"], row["user_id"], row["event_id"], row["saga_state"], error)
