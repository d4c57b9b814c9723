"""Refunds as durable intent: decided and recorded in a transaction, carried out after it.

No provider call runs inside a database transaction. Whatever decides that money goes back (a
buyer's or an organizer's cancel, a payment that outlived its seats, a charge found for a
booking that failed) calls :func:`request` in its own transaction: a ``refunds`` row, the
booking's payment ``refunding``, a ``payment.status`` message to its buyer. Once that has
committed, :func:`run` claims due refunds (a short statement that also leases them: other
workers leave them alone until ``next_at``, twice as long as a refund call may take), calls the
provider with the booking id as the idempotency key (so trying again never refunds twice), and
records the answer: ``refunded``, another attempt later with a growing pause, or after
:data:`MAX_ATTEMPTS` (or a refusal by the provider) ``dead``, which an operator sees in the
metrics and in the row's ``last_error``.
Recovery runs it every second on every instance; the paths that request a refund also run it
at once for their own, so a buyer usually sees ``refunded`` in the same answer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from bilten import metrics, payments
from bilten.db import Connection
from bilten.payments.resilience import backoff_delay
from bilten.state import State

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 30  # the pause doubles from 5 s to an hour: a provider may be out for a day
PAUSE = (5.0, 3600.0)
ROUND = 50


@dataclass(frozen=True)
class Wanted:
    booking_id: str
    payment_id: str
    amount_cents: int
    currency: str
    reason: str  # cancelled | event_cancelled | seats_lost | unconfirmed_charge | charge_mismatch


def _then_payment(changed: str, status: str, also: str = "") -> str:
    """The end of a statement whose CTE ``changed`` returns ``booking_id``s: those bookings'
    payment set to ``status`` (and ``also``), and each buyer told (a ``payment.status``
    message in the outbox)."""
    return f"""moved AS (
    UPDATE bookings b SET payment_status = '{status}', {also} updated_at = now()
    FROM {changed} WHERE b.id = {changed}.booking_id
    RETURNING b.id, b.user_id)
INSERT INTO outbox (topic, payload)
SELECT 'user', jsonb_build_object('user_id', user_id::text, 'message', jsonb_build_object(
    'type', 'payment.status', 'booking_id', id::text, 'status', '{status}'))
FROM moved
RETURNING 1
"""


_REQUEST = """
WITH r AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[])
        AS r(booking_id, payment_id, amount_cents, currency, reason)),
made AS (
    INSERT INTO refunds (booking_id, payment_id, amount_cents, currency, reason)
    SELECT * FROM r ON CONFLICT DO NOTHING
    RETURNING booking_id),
known AS (  -- a refund recorded before: nothing is unknown about this payment any more
    UPDATE bookings b SET payment_unsettled = false
    FROM r WHERE b.id = r.booking_id AND b.payment_unsettled
      AND NOT EXISTS (SELECT 1 FROM made WHERE made.booking_id = r.booking_id)),
""" + _then_payment("made", "refunding", "payment_unsettled = false,")


async def request(conn: Connection, wanted: list[Wanted]) -> None:
    """Record refunds to make, in the caller's transaction (a booking has one at the most)."""
    if not wanted:
        return
    made = await conn.fetch(
        _REQUEST,
        [w.booking_id for w in wanted],
        [w.payment_id for w in wanted],
        [w.amount_cents for w in wanted],
        [w.currency for w in wanted],
        [w.reason for w in wanted],
    )
    metrics.REFUNDS.labels("requested").inc(len(made))


_CLAIM = """
UPDATE refunds r SET attempts = r.attempts + 1, next_at = now() + make_interval(secs => $2)
FROM (SELECT booking_id FROM refunds
      WHERE status = 'pending' AND next_at <= now()
        AND ($3::uuid[] IS NULL OR booking_id = ANY ($3::uuid[]))
      ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
WHERE r.booking_id = due.booking_id
RETURNING r.booking_id::text, r.payment_id, r.amount_cents, r.attempts, r.round
"""

_DONE = """
WITH done AS (
    UPDATE refunds SET status = 'refunded', refund_id = $2, done_at = now(), last_error = NULL
    WHERE booking_id = $1 AND status <> 'refunded' AND amount_cents <= $3
    RETURNING booking_id),
""" + _then_payment("done", "refunded")


async def run(app: State, booking_ids: list[str] | None = None, limit: int = ROUND) -> int:
    """Carry out the refunds that are due (only these bookings' when given), concurrently;
    returns how many were confirmed."""
    # A claimed refund is left to its worker for longer than a refund call may take.
    settings = app.settings
    lease = settings.payment_timeout * (settings.payment_retries + 1) * 2 + 5
    due = await app.db.fetch(_CLAIM, limit, lease, booking_ids)
    done = await asyncio.gather(*(_carry_out_alone(app, row) for row in due))
    if booking_ids is None:
        await _count_waiting(app)
    return sum(done)


async def _carry_out_alone(app: State, due: Any) -> bool:
    """One refund; whatever goes wrong with it (the database, say) stays with it: its lease
    runs out and it is tried again."""
    try:
        return await _carry_out(app, due)
    except Exception:
        log.exception("refund of booking %s failed; it is tried again", due["booking_id"])
        return False


async def _carry_out(app: State, due: Any) -> bool:
    booking_id = due["booking_id"]
    try:
        refund_id = (
            await app.payments.refund(
                key=booking_id,
                payment_id=due["payment_id"],
                amount_cents=due["amount_cents"],
                round=due["round"],
            )
            if due["amount_cents"] > 0
            else "nothing"
        )
    except payments.PaymentDeclined as exc:
        await _give_up(app, booking_id, f"refused by the provider: {exc.decline_code}")
        return False
    except payments.ProviderUnavailable as exc:
        if due["attempts"] >= MAX_ATTEMPTS:
            await _give_up(app, booking_id, str(exc))
        else:
            pause = backoff_delay(due["attempts"] - 1, *PAUSE)
            await app.db.execute(
                """UPDATE refunds SET next_at = now() + make_interval(secs => $2),
                          last_error = $3
                   WHERE booking_id = $1 AND status = 'pending'""",
                booking_id,
                pause,
                str(exc),
            )
            metrics.REFUNDS.labels("retried").inc()
            log.warning("refund of booking %s failed, trying again in %.0f s", booking_id, pause)
        return False
    await confirmed(app, booking_id, refund_id, due["amount_cents"])
    return True


async def confirmed(app: State, booking_id: str, refund_id: str | None, amount: int) -> None:
    """The provider gave ``amount`` back (said by its answer, or by a webhook): the refund is
    done if that covers it (a webhook about a smaller refund made otherwise does not)."""
    if await app.db.fetchval(_DONE, booking_id, refund_id, amount):
        metrics.REFUNDS.labels("refunded").inc()
        metrics.REFUNDED_CENTS.inc(amount)


# A refund the provider reported failed after confirming it: due again, as a new round.
_FAILED_LATER = """
WITH again AS (
    UPDATE refunds SET status = 'pending', round = round + 1, attempts = 0, refund_id = NULL,
           done_at = NULL, next_at = now(), last_error = $3
    WHERE booking_id = $1 AND refund_id = $2 AND status = 'refunded'
    RETURNING booking_id),
""" + _then_payment("again", "refunding")


async def failed_later(app: State, booking_id: str, refund_id: str, error: str) -> bool:
    """The provider says a refund it had confirmed failed after all (a webhook): the booking's
    refund is due again, made anew by the refund worker. False if that refund is not the one
    recorded for the booking (another, or one already being made again)."""
    again = await app.db.fetchval(_FAILED_LATER, booking_id, refund_id, error)
    if again:
        metrics.REFUNDS.labels("failed_later").inc()
        log.warning(
            "refund %s of booking %s failed at the provider: made again", refund_id, booking_id
        )
    return bool(again)


async def _give_up(app: State, booking_id: str, error: str) -> None:
    """Dead, unless it was refunded meanwhile (a webhook, another worker): never over that."""
    dead = await app.db.fetchval(
        """UPDATE refunds SET status = 'dead', last_error = $2
           WHERE booking_id = $1 AND status = 'pending' RETURNING true""",
        booking_id,
        error,
    )
    if not dead:
        return
    metrics.REFUNDS.labels("dead").inc()
    log.error("refund of booking %s given up: %s (the refunds row keeps it)", booking_id, error)


async def _count_waiting(app: State) -> None:
    rows = await app.db.fetch(
        "SELECT status, count(*) AS n FROM refunds WHERE status <> 'refunded' GROUP BY status"
    )
    counts = {r["status"]: r["n"] for r in rows}
    for state in ("pending", "dead"):
        metrics.REFUNDS_WAITING.labels(state).set(counts.get(state, 0))
