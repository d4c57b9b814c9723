"""The booking saga: PENDING → SEATS_RESERVED → PAYMENT_PENDING → CONFIRMED, else FAILED.

Every transition is persisted (the booking row plus an append-only transitions row) before the
next step begins, so any instance can resume a saga another one left: each step first locks the
booking row and does nothing unless the booking is in the state the step starts from. The
payment is charged with the booking id as its idempotency key, so charging again after a crash
never charges twice. Compensations release the seats and refund what was taken.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import msgspec
from redis.asyncio.client import Pipeline

from bilten import bookings, holds, keys, metrics, notifications, outbox, payments, ticketcodes
from bilten.db import Connection
from bilten.errors import ApiError
from bilten.state import State

log = logging.getLogger(__name__)

# How long reserved seats stay held while the payment runs; longer than the provider's
# timeout times its retries, so a slow payment never finds its seats gone.
PAYMENT_WINDOW = 120

_BOOKING = """SELECT id::text, user_id::text, event_id::text, request, hold_id::text, saga_state,
                     total_cents, currency, payment_token, payment_id, payment_provider,
                     failure_code, failure_message, failure_details, created_at
              FROM bookings WHERE id = $1"""


@dataclass(frozen=True)
class Outcome:
    booking_id: str
    user_id: str
    event_id: str
    state: str
    error: ApiError | None = None
    booking: bookings.Booking | None = None  # the confirmed booking as the API shows it
    request_id: str = ""  # the queued request, when it is not the booking's own id


async def _transition(
    conn: Connection, booking_id: str, src: str, dst: str, reason: str | None = None
) -> None:
    await conn.execute(
        "UPDATE bookings SET saga_state = $2, updated_at = now() WHERE id = $1", booking_id, dst
    )
    await conn.execute(
        """INSERT INTO booking_transitions (booking_id, from_state, to_state, reason)
           VALUES ($1, $2, $3, $4)""",
        booking_id,
        src,
        dst,
        reason,
    )


async def _fail(conn: Connection, row: Any, error: ApiError, **payment: Any) -> Outcome:
    await conn.execute(
        """UPDATE bookings SET failure_code = $2, failure_message = $3, failure_details = $6,
                  payment_token = '',
                  payment_status = coalesce($4, payment_status),
                  payment_unsettled = payment_unsettled OR $5
           WHERE id = $1""",
        row["id"],
        error.code,
        error.message,
        payment.get("status"),
        payment.get("unsettled", False),
        error.details or {},
    )
    await _transition(conn, row["id"], row["saga_state"], "FAILED", error.code)
    await outbox.to_user(conn, row["user_id"], _result(row["id"], "failed", error))
    metrics.BOOKINGS.labels("failed", error.code).inc()
    return Outcome(row["id"], row["user_id"], row["event_id"], "FAILED", error)


def _result(booking_id: str, status: str, error: ApiError | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "booking.result",
        "request_id": booking_id,
        "booking_id": booking_id,
        "status": status,
    }
    if error is not None:
        message["error"] = {"code": error.code, "message": error.message, "details": error.details}
    return message


async def _items_of_hold(conn: Connection, hold: Any) -> list[holds.Item]:
    if hold["ticket_type_id"]:
        kind = await conn.fetchrow(
            "SELECT name, price_cents FROM ticket_types WHERE id = $1", hold["ticket_type_id"]
        )
        return [
            holds.Item(
                ticket_type_id=hold["ticket_type_id"],
                label=kind["name"],
                price_cents=kind["price_cents"],
            )
            for _ in range(hold["quantity"])
        ]
    rows = await conn.fetch(
        """SELECT es.seat_id::text AS seat_id, s.label, t.price_cents
           FROM event_seats es JOIN seats s ON s.id = es.seat_id
           JOIN price_tiers t ON t.id = es.tier_id
           WHERE es.event_id = $1 AND es.hold_id = $2 AND es.status = 'held'
           ORDER BY s.label""",
        hold["event_id"],
        hold["id"],
    )
    return [
        holds.Item(seat_id=r["seat_id"], label=r["label"], price_cents=r["price_cents"])
        for r in rows
    ]


async def _adopt_hold(conn: Connection, row: Any, hold_id: str) -> tuple[str, list[holds.Item]]:
    """Take over the shopper's hold for this booking, stretched over the payment window."""
    hold = await conn.fetchrow(
        """SELECT id::text, event_id::text, user_id::text, ticket_type_id::text, seat_ids,
                  quantity, status, expires_at <= now() AS expired
           FROM holds WHERE id = $1 FOR UPDATE""",
        hold_id,
    )
    if hold is None or hold["user_id"] != row["user_id"] or hold["event_id"] != row["event_id"]:
        raise ApiError("not_found", "No such hold.")
    if hold["status"] != "active" or hold["expired"]:
        raise ApiError("hold_expired", "The hold ran out before the booking.")
    taken = await conn.fetchval(
        """SELECT 1 FROM bookings WHERE hold_id = $1 AND id <> $2 AND saga_state <> 'FAILED'""",
        hold_id,
        row["id"],
    )
    if taken:
        raise ApiError("conflict", "Another booking is using this hold.", {"hold_id": hold_id})
    items = await _items_of_hold(conn, hold)
    if len(items) != hold["quantity"]:
        raise ApiError("hold_expired", "The hold ran out before the booking.")
    window = timedelta(seconds=PAYMENT_WINDOW)
    await conn.execute(
        "UPDATE holds SET expires_at = greatest(expires_at, now() + $2::interval) WHERE id = $1",
        hold_id,
        window,
    )
    await conn.execute(
        """UPDATE event_seats SET hold_expires_at = greatest(hold_expires_at, now() + $3::interval)
           WHERE event_id = $1 AND hold_id = $2""",
        row["event_id"],
        hold_id,
        window,
    )
    return hold_id, items


async def reserve(app: State, booking_id: str) -> Outcome | None:
    """PENDING → SEATS_RESERVED → PAYMENT_PENDING, or FAILED. None: someone else has it."""
    async with app.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_BOOKING + " FOR UPDATE SKIP LOCKED", booking_id)
        if row is None:
            return None
        if row["saga_state"] != "PENDING":
            return Outcome(row["id"], row["user_id"], row["event_id"], row["saga_state"])
        request = row["request"]
        try:
            async with conn.transaction():  # a savepoint: a refused claim leaves nothing behind
                if request.get("hold_id"):
                    hold_id, items = await _adopt_hold(conn, row, request["hold_id"])
                else:
                    hold = await holds.create(
                        conn,
                        user_id=row["user_id"],
                        event_id=row["event_id"],
                        seat_ids=request.get("seat_ids") or [],
                        ticket_type_id=request.get("ticket_type_id"),
                        quantity=len(request.get("seat_ids") or []) or request.get("quantity") or 0,
                        ttl=PAYMENT_WINDOW,
                    )
                    hold_id = hold.id
                    items = await _items_of_hold(
                        conn,
                        {
                            "id": hold.id,
                            "event_id": hold.event_id,
                            "quantity": hold.quantity,
                            "ticket_type_id": hold.ticket_type_id,
                        },
                    )
        except ApiError as error:
            return await _fail(conn, row, error, status="failed")
        await conn.executemany(
            """INSERT INTO booking_items (booking_id, position, seat_id, ticket_type_id, label,
                                          price_cents) VALUES ($1, $2, $3, $4, $5, $6)""",
            [
                (booking_id, i, it.seat_id, it.ticket_type_id, it.label, it.price_cents)
                for i, it in enumerate(items)
            ],
        )
        await conn.execute(
            "UPDATE bookings SET hold_id = $2, total_cents = $3 WHERE id = $1",
            booking_id,
            hold_id,
            sum(it.price_cents for it in items),
        )
        await _transition(conn, booking_id, "PENDING", "SEATS_RESERVED")
        # Recorded before the provider is called: a crash now leaves an unknown outcome, which
        # recovery looks up at the provider instead of guessing.
        await _transition(conn, booking_id, "SEATS_RESERVED", "PAYMENT_PENDING")
        return Outcome(row["id"], row["user_id"], row["event_id"], "PAYMENT_PENDING")


PaymentResult = payments.Charge | payments.PaymentDeclined | payments.ProviderUnavailable


async def pay(app: State, booking_id: str) -> PaymentResult | None:
    row = await app.db.fetchrow(_BOOKING, booking_id)
    if row is None or row["saga_state"] != "PAYMENT_PENDING":
        return None
    try:
        return await app.payments.charge(
            key=booking_id,
            amount_cents=row["total_cents"],
            currency=row["currency"],
            token=row["payment_token"],
        )
    except (payments.PaymentDeclined, payments.ProviderUnavailable) as exc:
        return exc


async def _confirm(
    conn: Connection, app: State, row: Any, charge: payments.Charge
) -> Outcome | None:
    """Seats sold, units counted, tickets issued, booking confirmed; None if the hold is gone."""
    hold = await conn.fetchrow(
        "SELECT ticket_type_id::text, quantity, status FROM holds WHERE id = $1 FOR UPDATE",
        row["hold_id"],
    )
    if hold is None or hold["status"] != "active":
        return None
    if hold["ticket_type_id"]:
        await conn.execute(
            """UPDATE ticket_types SET held = held - $2, sold = sold + $2,
                      version = nextval('catalog_version') WHERE id = $1""",
            hold["ticket_type_id"],
            hold["quantity"],
        )
        await outbox.catalog_changed(conn, row["event_id"])
    else:
        # Count (and lock) the seats the hold still has before selling any: a hold that lost
        # one is not confirmed at all.
        still_held = await conn.fetch(
            """SELECT seat_id FROM event_seats
               WHERE event_id = $1 AND hold_id = $2 AND status = 'held'
               ORDER BY seat_id FOR UPDATE""",
            row["event_id"],
            row["hold_id"],
        )
        if len(still_held) != hold["quantity"]:
            return None
        sold = await conn.fetch(
            """UPDATE event_seats SET status = 'sold', booking_id = $3, hold_id = NULL,
                      hold_expires_at = NULL, version = nextval('catalog_version')
               WHERE event_id = $1 AND hold_id = $2 AND status = 'held'
               RETURNING seat_id::text, version""",
            row["event_id"],
            row["hold_id"],
            row["id"],
        )
        await outbox.seat_changes(
            conn, row["event_id"], [(r["seat_id"], "sold", r["version"]) for r in sold]
        )
    await conn.execute("UPDATE holds SET status = 'booked' WHERE id = $1", row["hold_id"])
    items = await conn.fetch(
        "SELECT seat_id, ticket_type_id, label FROM booking_items WHERE booking_id = $1",
        row["id"],
    )
    ticket_ids = [str(uuid.uuid4()) for _ in items]
    signing_key = await ticketcodes.private_key(conn, row["event_id"])
    await conn.executemany(
        """INSERT INTO tickets (id, booking_id, event_id, user_id, seat_id, ticket_type_id, label,
                                code) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        [
            (
                ticket_id,
                row["id"],
                row["event_id"],
                row["user_id"],
                item["seat_id"],
                item["ticket_type_id"],
                item["label"],
                ticketcodes.sign(signing_key, ticket_id, row["event_id"]),
            )
            for ticket_id, item in zip(ticket_ids, items, strict=True)
        ],
    )
    await conn.execute(
        "UPDATE bookings SET payment_status = 'succeeded', payment_id = $2, payment_token = '' "
        "WHERE id = $1",
        row["id"],
        charge.id,
    )
    await _transition(conn, row["id"], "PAYMENT_PENDING", "CONFIRMED")
    await outbox.to_user(conn, row["user_id"], _result(row["id"], "confirmed"))
    await notifications.booking_changed(conn, "booking_confirmed", row["id"], row["user_id"])
    metrics.BOOKINGS.labels("confirmed", "").inc()
    return Outcome(row["id"], row["user_id"], row["event_id"], "CONFIRMED")


async def finish(app: State, booking_id: str, result: PaymentResult) -> Outcome | None:
    """PAYMENT_PENDING → CONFIRMED, or FAILED with the seats released and nothing kept."""
    async with app.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_BOOKING + " FOR UPDATE", booking_id)
        if row is None or row["saga_state"] != "PAYMENT_PENDING":
            return None
        if isinstance(result, payments.Charge):
            confirmed = await _confirm(conn, app, row, result)
            if confirmed is not None:
                return confirmed
            # Paid, but the seats are gone (the payment outlived its window): give it back.
            refunded = True
            try:
                await app.payments.refund(
                    key=booking_id, payment_id=result.id, amount_cents=result.amount_cents
                )
            except (payments.PaymentDeclined, payments.ProviderUnavailable) as exc:
                # Not refunded yet: the settling sweeper looks the charge up and tries again.
                log.warning("refund of booking %s failed for now: %s", booking_id, exc)
                refunded = False
            await holds.release(conn, row["hold_id"], "expired")
            return await _fail(
                conn,
                row,
                ApiError("hold_expired", "The hold ran out before the booking."),
                status="refunded" if refunded else "failed",
                unsettled=not refunded,
            )
        await holds.release(conn, row["hold_id"])
        if isinstance(result, payments.PaymentDeclined):
            error = ApiError(
                "payment_declined", "The card was declined.", {"decline_code": result.decline_code}
            )
            return await _fail(conn, row, error, status="failed")
        # The provider failed: nothing should have been charged, but we cannot know; a sweeper
        # looks the payment up later and refunds anything it finds.
        error = ApiError(
            "unavailable",
            "The payment provider is unavailable; nothing was charged.",
            headers={"Retry-After": "5"},
        )
        return await _fail(conn, row, error, status="failed", unsettled=True)


async def run(app: State, booking_id: str) -> Outcome | None:
    """Drive one booking as far as it goes; None when another worker holds it."""
    began = time.monotonic()
    outcome = await reserve(app, booking_id)
    if outcome is None or outcome.state != "PAYMENT_PENDING":
        return outcome
    result = await pay(app, booking_id)
    if result is None:
        return None
    done = await finish(app, booking_id, result)
    metrics.SAGA_SECONDS.observe(time.monotonic() - began)
    return done


async def recover(app: State, booking_id: str) -> Outcome | None:
    """Resume a saga found unfinished: look the payment up before deciding anything."""
    row = await app.db.fetchrow(_BOOKING, booking_id)
    if row is None:
        return None
    if row["saga_state"] == "PENDING":
        return await run(app, booking_id)
    if row["saga_state"] != "PAYMENT_PENDING":
        return None
    try:
        known = await app.payments.lookup(key=booking_id)
    except payments.ProviderUnavailable:
        return None  # try again later
    result: PaymentResult | None = known
    if result is None:
        result = await pay(app, booking_id)
    if result is None:
        return None
    return await finish(app, booking_id, result)


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
        pipe.publish(keys.BOOKING_DONE, b"\n".join(ended))


_encode_done = msgspec.json.Encoder().encode


async def cancel(app: State, booking_id: str) -> Outcome:
    """CONFIRMED → CANCELLED: the payment refunded, seats and units given back, tickets void.

    The booking stays locked while the refund is made, so two cancels cannot both refund; a
    refund the provider refuses leaves everything as it was (the caller gets 503).
    """
    async with app.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            _BOOKING.replace("payment_id,", "payment_id, payment_status,") + " FOR UPDATE",
            booking_id,
        )
        if row is None:
            raise ApiError("not_found", "No such booking.")
        if row["saga_state"] != "CONFIRMED":
            raise ApiError(
                "conflict",
                f"Only a confirmed booking can be cancelled; this one is "
                f"{row['saga_state'].lower()}.",
                {"status": row["saga_state"].lower()},
            )
        try:
            await app.payments.refund(
                key=booking_id, payment_id=row["payment_id"], amount_cents=row["total_cents"]
            )
        except payments.ProviderUnavailable:
            raise ApiError(
                "unavailable",
                "The refund could not be made now; nothing changed.",
                headers={"Retry-After": "5"},
            ) from None
        except payments.PaymentDeclined as exc:
            raise ApiError(
                "conflict",
                f"The provider refused the refund: {exc.decline_code}.",
                {"decline_code": exc.decline_code},
            ) from None
        await _release_sold(conn, row)
        await _transition(conn, booking_id, "CONFIRMED", "CANCELLED", "cancelled")
        await conn.execute(
            "UPDATE bookings SET payment_status = 'refunded' WHERE id = $1", booking_id
        )
        await outbox.to_user(conn, row["user_id"], _result(booking_id, "cancelled"))
        await notifications.booking_changed(conn, "booking_cancelled", booking_id, row["user_id"])
        await outbox.to_user(
            conn,
            row["user_id"],
            {"type": "payment.status", "booking_id": booking_id, "status": "refunded"},
        )
        metrics.BOOKINGS.labels("cancelled", "").inc()
        return Outcome(booking_id, row["user_id"], row["event_id"], "CANCELLED")


async def _release_sold(conn: Connection, row: Any) -> None:
    freed = await conn.fetch(
        """UPDATE event_seats SET status = 'available', booking_id = NULL,
                  version = nextval('catalog_version')
           WHERE event_id = $1 AND booking_id = $2 AND status = 'sold'
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


async def apply_webhook(app: State, kind: str, obj: dict[str, Any]) -> None:
    """Apply a provider callback about a payment made with a booking id as its key."""
    metadata = obj.get("metadata") or {}
    booking_id = str(metadata.get("booking_id", ""))
    try:
        booking_id = str(uuid.UUID(booking_id))
    except ValueError:
        return
    outcome: Outcome | None = None
    if kind == "payment_intent.succeeded":
        charge = payments.Charge(
            id=str(obj.get("id")),
            amount_cents=int(obj.get("amount", 0)),
            currency=str(obj.get("currency", "")).upper(),
            status="succeeded",
        )
        outcome = await finish(app, booking_id, charge)
    elif kind == "payment_intent.payment_failed":
        error = obj.get("last_payment_error") or {}
        outcome = await finish(
            app, booking_id, payments.PaymentDeclined(str(error.get("decline_code") or "declined"))
        )
    elif kind == "charge.refunded":
        await app.db.execute(
            """UPDATE bookings SET payment_status = 'refunded', updated_at = now()
               WHERE id = $1 AND saga_state IN ('CANCELLED', 'FAILED')""",
            booking_id,
        )
    if outcome is not None:
        await announce(app, outcome)
