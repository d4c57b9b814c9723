"""Bookings: requests with their idempotency keys, reads, and what the API shows of them."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

import msgspec

from bilten import cursors
from bilten.db import Connection
from bilten.errors import ApiError
from bilten.queue import Request

TERMINAL = ("CONFIRMED", "FAILED", "CANCELLED")


class BookingItem(msgspec.Struct, kw_only=True):
    seat_id: str | None = None
    ticket_type_id: str | None = None
    label: str
    price_cents: int


class Payment(msgspec.Struct, kw_only=True):
    status: Literal["pending", "succeeded", "failed", "refunding", "refunded"]
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


class Done(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How a request ended, as workers announce it: what a waiting ``POST /bookings`` answers.

    ``booking`` comes with a confirmation made by a batch; without it the reader looks the
    booking up. ``booking_id`` differs from ``request_id`` only when the request turned out to
    repeat an earlier one (same user and Idempotency-Key).
    """

    request_id: str
    booking_id: str
    status: Literal["processing", "confirmed", "failed", "cancelled"]
    booking: Booking | None = None
    error: Failure | None = None


def key_reused(key: str) -> ApiError:
    """422: the same Idempotency-Key with another body."""
    return ApiError(
        "idempotency_mismatch",
        "This Idempotency-Key was used with another request body.",
        {"idempotency_key": key},
    )


def body_hash(request: msgspec.Struct) -> str:
    """Of the decoded body, so spacing and key order do not make two bodies differ."""
    return hashlib.sha256(msgspec.json.encode(request, order="sorted")).hexdigest()


async def create_many(conn: Connection, requests: list[Request]) -> dict[str, tuple[str, str, str]]:
    """Make the PENDING booking rows of queued requests, in one statement.

    Returns, for each request, the booking that stands for it, its body hash and saga state:
    its own new row; the same row when a request is handled again (its worker died); or an
    earlier booking of the same user and Idempotency-Key. A request whose event or user is gone
    is left out.
    """
    if not requests:
        return {}
    ordered = sorted(requests, key=lambda r: (r.user_id, r.key))  # one lock order for all
    columns = list(
        zip(
            *(
                (r.id, r.user_id, r.event_id, r.key, r.digest, r.request, r.provider, r.token)
                for r in ordered
            ),
            strict=True,
        )
    )
    await conn.execute(
        """INSERT INTO bookings (id, user_id, event_id, idempotency_key, body_hash, request,
                                 currency, payment_provider, payment_token, history)
           SELECT r.id, r.user_id, r.event_id, r.key, r.digest, r.request, e.currency,
                  r.provider, r.token,
                  jsonb_build_array(jsonb_build_object(
                      'to', 'PENDING', 'reason', 'requested', 'at', now()))
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                       $6::jsonb[], $7::text[], $8::text[])
                AS r(id, user_id, event_id, key, digest, request, provider, token)
           JOIN events e ON e.id = r.event_id
           JOIN users u ON u.id = r.user_id
           ON CONFLICT DO NOTHING""",
        *map(list, columns),
    )
    rows = await conn.fetch(
        """SELECT q.id::text AS request_id, b.id::text AS booking_id, b.body_hash, b.saga_state
           FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS q(id, user_id, key)
           JOIN bookings b ON b.user_id = q.user_id AND b.idempotency_key = q.key""",
        *map(list, (columns[0], columns[1], columns[3])),
    )
    return {r["request_id"]: (r["booking_id"], r["body_hash"], r["saga_state"]) for r in rows}


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


async def request_owner(conn: Connection, request_id: str, booking_id: str) -> str | None:
    """Who made a booking request, from the record: its booking, or its accepted request."""
    found: str | None = await conn.fetchval(
        """SELECT user_id::text FROM bookings WHERE id = $1 OR id = $2
           UNION ALL
           SELECT convert_from(request, 'UTF8')::jsonb ->> 'user_id' FROM accepted_requests
           WHERE id = $1
           LIMIT 1""",
        request_id,
        booking_id,
    )
    return found


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
