"""The booking saga, driven: charges, runs, recovery, announcements, cancel, webhooks.

A run reserves (:mod:`bilten.sagas.reserve`), charges concurrently (:func:`charge_all`: the
booking id is the idempotency key, so charging again never charges twice) and finishes
(:mod:`bilten.sagas.finish`). The queue runs its batches through the same steps
(:mod:`bilten.sagas.batch`); recovery resumes what a stopped worker left.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import msgspec
from redis.asyncio.client import Pipeline

from bilten import bookings, keys, metrics, notifications, outbox, payments, pubsub, refunds
from bilten.db import Connection
from bilten.errors import ApiError
from bilten.payments import webhooks
from bilten.sagas import steps
from bilten.sagas.finish import finish, finish_committed
from bilten.sagas.reserve import reserve
from bilten.sagas.steps import (
    BOOKING,
    MANY,
    Outcome,
    Payable,
    PaymentResult,
    result_message,
)
from bilten.state import State

log = logging.getLogger(__name__)


async def _charge(app: State, booking_id: str, due: Payable) -> PaymentResult:
    try:
        return await app.payments.charge(
            key=booking_id, amount_cents=due.amount_cents, currency=due.currency, token=due.token
        )
    except (payments.PaymentDeclined, payments.ProviderUnavailable) as exc:
        return exc


OUTAGE_PAUSE = (0.5, 8.0)  # seconds between charges again while the provider is out: first, most
WAVE = 0.02  # seconds a wave of answered charges waits for more before it is finished
_warned = 0.0


async def _charge_patiently(
    app: State, booking_id: str, due: Payable, deadline: float
) -> PaymentResult:
    """A charge; while the provider cannot answer it, charged again (same key: never twice)
    with a growing pause until ``deadline``, then ``ProviderUnavailable``. Declines are final."""
    global _warned
    result = await _charge(app, booking_id, due)
    pause = OUTAGE_PAUSE[0]
    while isinstance(result, payments.ProviderUnavailable):
        if time.monotonic() + pause > deadline:
            break
        if time.monotonic() - _warned > 5:
            _warned = time.monotonic()
            log.warning("payment provider unavailable: charges wait and are made again")
        await asyncio.sleep(pause)
        pause = min(pause * 2, OUTAGE_PAUSE[1])
        result = await _charge(app, booking_id, due)
    return result


async def charge_all(
    app: State, payable: dict[str, Payable], *, patience: float
) -> dict[str, PaymentResult]:
    """Charge concurrently. A provider outage pauses, it does not fail: what the provider could
    not answer is charged again for up to ``patience`` seconds (see :func:`_charge_patiently`).
    (A queue batch waits ``payment_outage_wait``: its event's queue waits with it, since with
    the provider out it could sell nothing anyway.)"""
    deadline = time.monotonic() + patience
    charged = await asyncio.gather(
        *(_charge_patiently(app, b, due, deadline) for b, due in payable.items())
    )
    return dict(zip(payable, charged, strict=True))


async def pay_and_finish(
    app: State, payable: dict[str, Payable], *, patience: float
) -> dict[str, Outcome]:
    """The charges, concurrently, then :func:`finish` in one transaction."""
    if not payable:
        return {}
    return await finish(app, await charge_all(app, payable, patience=patience))


async def pay_and_finish_waves(
    app: State, payable: dict[str, Payable], *, patience: float
) -> AsyncIterator[dict[str, Outcome]]:
    """The charges, concurrently; the bookings whose charges were answered are finished as
    they come, a wave at a time (those answered within ``WAVE`` of the first of them), so a
    slow charge holds up only its own booking. The waves of every batch in flight are finished
    together (``app.finishing``): one transaction at a time, each taking all the waves that
    came while the one before ran, instead of many small transactions side by side. Charges
    still out when the caller stops listening are cancelled; their bookings stay
    PAYMENT_PENDING for recovery, which looks the payment up by its key."""
    deadline = time.monotonic() + patience
    charging = {
        asyncio.ensure_future(_charge_patiently(app, b, due, deadline)): b
        for b, due in payable.items()
    }
    try:
        while charging:
            done, _ = await asyncio.wait(charging, return_when=asyncio.FIRST_COMPLETED)
            if len(done) < len(charging):
                await asyncio.sleep(WAVE)  # fewer, larger finishes
                done = {t for t in charging if t.done()}
            answered = {charging.pop(t): t.result() for t in done}
            finished = await app.finishing.call(answered, functools.partial(finish_committed, app))
            # Refunds are this wave's own provider calls: they hold up no other batch's finish.
            refund = [b for b, (_, wanted) in finished.items() if wanted]
            if refund:
                await refunds.run(app, refund)
            yield {b: outcome for b, (outcome, _) in finished.items()}
    finally:
        for task in charging:
            task.cancel()


async def run(app: State, booking_ids: list[str], *, patience: float) -> dict[str, Outcome | None]:
    """Drive bookings as far as they go, from PENDING (or from PAYMENT_PENDING, where a stopped
    worker left them); None for those another worker holds. ``patience``: see charge_all."""
    async with app.db.acquire() as conn, conn.transaction():
        outcomes, payable = await reserve(conn, booking_ids, steps.payment_window(app.settings))
    outcomes.update(await pay_and_finish(app, payable, patience=patience))
    return outcomes


async def recover(app: State, booking_ids: list[str]) -> dict[str, Outcome | None]:
    """Resume sagas found unfinished. A payment that may have been made is looked up at the
    provider first; one it cannot answer for now waits for the next round."""
    outcomes: dict[str, Outcome | None] = dict.fromkeys(booking_ids)
    rows = await app.db.fetch(MANY, booking_ids)
    pending = [r["id"] for r in rows if r["saga_state"] == "PENDING"]
    if pending:
        # Recovery does not wait out an outage: its next round comes soon enough.
        outcomes.update(await run(app, pending, patience=0))
    results: dict[str, PaymentResult] = {}
    unknown: dict[str, Payable] = {}
    for row in rows:
        if row["saga_state"] != "PAYMENT_PENDING":
            continue
        try:
            known = await app.payments.lookup(key=row["id"])
        except payments.ProviderUnavailable:
            continue
        if known is not None:
            results[row["id"]] = known
        else:
            unknown[row["id"]] = Payable(row["total_cents"], row["currency"], row["payment_token"])
    results.update(await charge_all(app, unknown, patience=0))
    if results:
        outcomes.update(await finish(app, results))
    return outcomes


async def announce(app: State, outcome: Outcome) -> None:
    await announce_many(app, [outcome])


async def announce_many(app: State, outcomes: list[Outcome]) -> None:
    """After sagas moved: each request's status for pollers, and its outcome for waiters."""
    if outcomes:
        async with app.redis.pipeline(transaction=False) as pipe:
            add_announcements(pipe, outcomes)
            await pipe.execute()


def add_announcements(pipe: Pipeline, outcomes: list[Outcome]) -> None:
    """:func:`announce_many` as commands on the caller's pipeline."""
    ended: list[bytes] = []
    for outcome in outcomes:
        status = {"CONFIRMED": "confirmed", "FAILED": "failed", "CANCELLED": "cancelled"}.get(
            outcome.state, "processing"
        )
        request_id = outcome.request_id or outcome.booking_id
        done = _encode_done(
            bookings.Done(
                request_id=request_id,
                booking_id=outcome.booking_id,
                status=cast(Any, status),
                booking=outcome.booking,
                error=bookings.Failure(
                    code=outcome.error.code,
                    message=outcome.error.message,
                    details=outcome.error.details or {},
                )
                if outcome.error is not None
                else None,
            )
        )
        mapping: dict[str | bytes, Any] = {"status": status, "booking_id": outcome.booking_id}
        if outcome.error is not None:
            mapping["error"] = outcome.error.code
        if status != "processing":
            mapping["result"] = done
        key = keys.booking_request(request_id)
        pipe.hset(key, mapping=cast(Any, mapping))
        pipe.expire(key, 86400)
        if status != "processing":
            ended.append(request_id.encode() + b" " + done)  # JSON has no raw newline
    if ended:
        pubsub.publish(pipe, keys.BOOKING_DONE, b"\n".join(ended))


_encode_done = msgspec.json.Encoder().encode


# → CANCELLED: the booking (its history step included) and its buyer's message in one statement.
_CANCELLED = """
WITH moved AS (
    UPDATE bookings SET saga_state = 'CANCELLED', updated_at = now(),
           history = history || jsonb_build_object(
               'from', 'CONFIRMED', 'to', 'CANCELLED', 'reason', $2::text, 'at', now())
    WHERE id = $1 AND saga_state = 'CONFIRMED'
    RETURNING id)
INSERT INTO outbox (topic, payload) SELECT 'user', $3::jsonb FROM moved
"""


def _refused(reason: str, message: str) -> ApiError:
    return ApiError("conflict", message, {"reason": reason})


async def cancel(app: State, booking_id: str, *, by_organizer: bool = False) -> Outcome:
    """CONFIRMED → CANCELLED: seats and units given back, tickets void, the payment to be
    refunded (``refunding``), all in one transaction that commits before the provider is
    called; the refund is then tried at once, and retried by the refund worker until the
    provider confirms it (:mod:`bilten.refunds`).

    A buyer may not cancel once a ticket was checked in (``checked_in``) or the event has
    begun (``event_started``); an organizer's cancellation of the whole event refunds every
    booking whatever its tickets' state. The tickets are locked before they are looked at, so
    a cancel and a check-in of one ticket never both win.
    """
    async with app.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(BOOKING + " FOR UPDATE", booking_id)
        if row is None:
            raise ApiError("not_found", "No such booking.")
        if row["saga_state"] == "CANCELLED":
            raise _refused("already_cancelled", "The booking is cancelled already.")
        if row["saga_state"] != "CONFIRMED":
            raise ApiError(
                "conflict",
                f"Only a confirmed booking can be cancelled; this one is "
                f"{row['saga_state'].lower()}.",
                {"reason": "not_confirmed", "status": row["saga_state"].lower()},
            )
        tickets = await conn.fetch(
            "SELECT status FROM tickets WHERE booking_id = $1 ORDER BY id FOR UPDATE", booking_id
        )
        if not by_organizer:
            if any(t["status"] == "checked_in" for t in tickets):
                raise _refused("checked_in", "A ticket of this booking was used at the door.")
            if await conn.fetchval(
                "SELECT starts_at <= now() FROM events WHERE id = $1", row["event_id"]
            ):
                raise _refused("event_started", "The event has begun.")
        await _release_sold(conn, row)
        await conn.execute(
            _CANCELLED,
            booking_id,
            "event_cancelled" if by_organizer else "cancelled",
            {"user_id": row["user_id"], "message": result_message(booking_id, "cancelled")},
        )
        await refunds.request(
            conn,
            [
                refunds.Wanted(
                    booking_id,
                    row["payment_id"],
                    row["total_cents"],
                    row["currency"],
                    "event_cancelled" if by_organizer else "cancelled",
                )
            ],
        )
        await notifications.booking_changed(conn, "booking_cancelled", booking_id, row["user_id"])
    metrics.BOOKINGS.labels("cancelled", "").inc()
    await refunds.run(app, [booking_id])  # committed first: no provider call inside it
    return Outcome(booking_id, row["user_id"], row["event_id"], "CANCELLED")


async def _release_sold(conn: Connection, row: Any) -> None:
    # Seats locked in seat order first, as every path locks them (docs/bookings.md); found
    # through the booking's items, by primary key.
    mine = "seat_id IN (SELECT seat_id FROM booking_items WHERE booking_id = $2)"
    await conn.execute(
        f"""SELECT 1 FROM event_seats WHERE event_id = $1 AND {mine} AND booking_id = $2
              AND status = 'sold' ORDER BY seat_id FOR UPDATE""",
        row["event_id"],
        row["id"],
    )
    freed = await conn.fetch(
        f"""UPDATE event_seats SET status = 'available', booking_id = NULL,
                  version = nextval('catalog_version')
           WHERE event_id = $1 AND {mine} AND booking_id = $2 AND status = 'sold'
           RETURNING seat_id::text, version""",
        row["event_id"],
        row["id"],
    )
    await outbox.seat_changes(
        conn, row["event_id"], [(r["seat_id"], "available", r["version"]) for r in freed]
    )
    units = await conn.fetch(
        """SELECT ticket_type_id, count(*) AS n FROM booking_items
           WHERE booking_id = $1 AND ticket_type_id IS NOT NULL GROUP BY ticket_type_id""",
        row["id"],
    )
    for unit in units:
        await conn.execute(
            """UPDATE ticket_types SET sold = sold - $2, version = nextval('catalog_version')
               WHERE id = $1""",
            unit["ticket_type_id"],
            unit["n"],
        )
    if units:
        await outbox.catalog_changed(conn, row["event_id"])
    await conn.execute(
        "UPDATE tickets SET status = 'void' WHERE booking_id = $1 AND status <> 'void'", row["id"]
    )


async def refund_stray(app: State, booking_id: str, charge: payments.Charge) -> None:
    """A charge the provider took for a booking that failed or was cancelled (found by a
    lookup, or told by a webhook): refunded, as durable intent, unless it is already (a
    booking has one refund at the most)."""
    async with app.db.acquire() as conn, conn.transaction():
        state = await conn.fetchval(
            "SELECT saga_state FROM bookings WHERE id = $1 FOR UPDATE", booking_id
        )
        if state not in ("FAILED", "CANCELLED") or charge.status != "succeeded":
            return
        await refunds.request(
            conn,
            [
                refunds.Wanted(
                    booking_id,
                    charge.id,
                    charge.amount_cents,
                    charge.currency,
                    "unconfirmed_charge",
                )
            ],
        )
    await refunds.run(app, [booking_id])


async def apply_webhook(app: State, kind: str, obj: webhooks.EventObject) -> None:
    """Apply a provider callback about a payment made with a booking id as its key."""
    try:
        booking_id = str(uuid.UUID(obj.metadata.booking_id if obj.metadata else ""))
    except ValueError:
        return
    result: PaymentResult | None = None
    if kind == "payment_intent.succeeded":
        result = payments.Charge(
            id=obj.id,
            amount_cents=obj.amount,
            currency=obj.currency.upper(),
            status="succeeded",
        )
    elif kind == "payment_intent.payment_failed":
        error = obj.last_payment_error
        result = payments.PaymentDeclined((error and error.decline_code) or "declined")
    elif kind in ("charge.refund.updated", "refund.updated", "refund.failed"):
        if obj.status in ("failed", "canceled"):
            reason = f"refund {obj.id} {obj.status} at the provider"
            await refunds.failed_later(app, booking_id, obj.id, reason)
    elif kind == "charge.refunded":
        await refunds.confirmed(app, booking_id, None, obj.amount_refunded)
        await app.db.execute(
            """UPDATE bookings SET payment_status = 'refunded', updated_at = now()
               WHERE id = $1 AND saga_state IN ('CANCELLED', 'FAILED') AND total_cents <= $2""",
            booking_id,
            obj.amount_refunded,
        )
    if result is not None:
        # A charge for a booking that failed or was cancelled meanwhile is refunded by finish.
        outcomes = await finish(app, {booking_id: result})
        await announce_many(app, list(outcomes.values()))
