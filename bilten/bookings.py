"""Bookings: requests with their idempotency keys, reads, and what the API shows of them."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

import msgspec

from bilten import cursors
from bilten.db import Connection
from bilten.errors import ApiError

TERMINAL = ("CONFIRMED", "FAILED", "CANCELLED")


class BookingItem(msgspec.Struct, kw_only=True):
    seat_id: str | None = None
    ticket_type_id: str | None = None
    label: str
    price_cents: int


class Payment(msgspec.Struct, kw_only=True):
    status: Literal["pending", "succeeded", "failed", "refunded"]
    provider: str
    amount_cents: int


class TicketRef(msgspec.Struct, kw_only=True):
    id: str
    code: str
    label: str


class Failure(msgspec.Struct, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class Booking(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    event_id: str
    status: Literal["pending", "confirmed", "failed", "cancelled"]
    items: list[BookingItem]
    total_cents: int
    currency: str
    payment: Payment
    tickets: list[TicketRef]
    failure: Failure | None = None
    created_at: datetime


def body_hash(request: msgspec.Struct) -> str:
    """Of the decoded body, so spacing and key order do not make two bodies differ."""
    return hashlib.sha256(msgspec.json.encode(request, order="sorted")).hexdigest()


async def create_request(
    conn: Connection,
    *,
    booking_id: str,
    user_id: str,
    event_id: str,
    key: str,
    digest: str,
    request: dict[str, Any],
    currency: str,
    provider: str,
    token: str,
) -> tuple[str, bool]:
    """Record a booking request; returns its id and whether it is new.

    The same key with the same body finds the first request; with another body it is a 422.
    """
    row = None
    for _ in range(2):
        created = await conn.fetchval(
            """INSERT INTO bookings (id, user_id, event_id, idempotency_key, body_hash, request,
                                     currency, payment_provider, payment_token)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING id::text""",
            booking_id,
            user_id,
            event_id,
            key,
            digest,
            request,
            currency,
            provider,
            token,
        )
        if created:
            await conn.execute(
                "INSERT INTO booking_transitions (booking_id, to_state, reason) "
                "VALUES ($1, 'PENDING', 'requested')",
                booking_id,
            )
            return str(created), True
        row = await conn.fetchrow(
            "SELECT id::text, body_hash FROM bookings WHERE user_id = $1 AND idempotency_key = $2",
            user_id,
            key,
        )
        if row is not None:
            break
        # The request that held this key was just refused (its queue was full): try again.
    if row is None:
        raise ApiError("conflict", "A request with this Idempotency-Key is being handled.")
    if row["body_hash"] != digest:
        raise ApiError(
            "idempotency_mismatch",
            "This Idempotency-Key was used with another request body.",
            {"idempotency_key": key},
        )
    return str(row["id"]), False


async def get(conn: Connection, booking_id: str, viewer: str | None = None) -> Booking | None:
    """A booking as the API shows it; with ``viewer``, only that user's."""
    # One round trip: the items and tickets come along as JSON arrays.
    row = await conn.fetchrow(
        """SELECT b.id::text, b.event_id::text, b.status, b.total_cents, b.currency,
                  b.payment_status, b.payment_provider, b.failure_code, b.failure_message,
                  b.failure_details, b.created_at,
                  coalesce((SELECT json_agg(json_build_object(
                                'seat_id', i.seat_id, 'ticket_type_id', i.ticket_type_id,
                                'label', i.label, 'price_cents', i.price_cents)
                                ORDER BY i.position)
                            FROM booking_items i WHERE i.booking_id = b.id), '[]') AS items,
                  coalesce((SELECT json_agg(json_build_object(
                                'id', t.id, 'code', t.code, 'label', t.label)
                                ORDER BY t.label, t.id)
                            FROM tickets t WHERE t.booking_id = b.id), '[]') AS tickets
           FROM bookings b WHERE b.id = $1 AND ($2::uuid IS NULL OR b.user_id = $2)""",
        booking_id,
        viewer,
    )
    if row is None:
        return None
    return Booking(
        id=row["id"],
        event_id=row["event_id"],
        status=row["status"],
        items=[BookingItem(**i) for i in row["items"]],
        total_cents=row["total_cents"],
        currency=row["currency"],
        payment=Payment(
            status=row["payment_status"],
            provider=row["payment_provider"],
            amount_cents=row["total_cents"],
        ),
        tickets=[TicketRef(**t) for t in row["tickets"]],
        failure=Failure(
            code=row["failure_code"],
            message=row["failure_message"] or "",
            details=row["failure_details"] or {},
        )
        if row["failure_code"]
        else None,
        created_at=row["created_at"],
    )


async def owner(conn: Connection, booking_id: str) -> tuple[str, str] | None:
    row = await conn.fetchrow(
        "SELECT user_id::text, saga_state FROM bookings WHERE id = $1", booking_id
    )
    return (row["user_id"], row["saga_state"]) if row else None


async def list_for(
    conn: Connection, user_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Booking], str | None]:
    """The user's bookings, newest first, a keyset page at a time."""
    after = cursors.decode(cursor) if cursor else None
    rows = await conn.fetch(
        """SELECT id::text, created_at FROM bookings
           WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)
             AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
           ORDER BY created_at DESC, id DESC LIMIT $5""",
        user_id,
        status,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    page = rows[:limit]
    found = [await get(conn, r["id"]) for r in page]
    next_cursor = None
    if len(rows) > limit and page:
        last = page[-1]
        next_cursor = cursors.encode(last["created_at"], last["id"])
    return [b for b in found if b is not None], next_cursor
