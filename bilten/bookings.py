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


async def standing(
    conn: Connection, requests: list[Request]
) -> tuple[dict[str, tuple[str, str, str]], list[Request], dict[str, str]]:
    """Sort queued requests out before any booking row is written.

    Returns, for each request, the booking that stands for it, its body hash and saga state:
    an earlier booking of the same user and Idempotency-Key (its own row when a request is
    handled again after its worker died), or, for the first new request of each user and key,
    the booking it is to make (``PENDING``: not written yet; a later request of the batch with
    the same user and key stands for it). Also returns those requests to make bookings for, and
    their events' currencies. A request whose event or user is gone is left out.
    """
    if not requests:
        return {}, [], {}
    found: dict[str, tuple[str, str, str]] = {}
    # One round trip: the bookings of the same users and keys, the users, the events.
    known = await conn.fetchrow(
        """SELECT (SELECT array_agg(ARRAY[q.id::text, b.id::text, b.body_hash, b.saga_state])
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS q(id, user_id, key)
                   JOIN bookings b ON b.user_id = q.user_id AND b.idempotency_key = q.key)
                      AS standing,
                  (SELECT array_agg(id::text) FROM users WHERE id = ANY ($4::uuid[])) AS users,
                  (SELECT jsonb_object_agg(id::text, currency) FROM events
                   WHERE id = ANY ($5::uuid[])) AS events""",
        [r.id for r in requests],
        [r.user_id for r in requests],
        [r.key for r in requests],
        sorted({r.user_id for r in requests}),
        sorted({r.event_id for r in requests}),
    )
    for request_id, booking_id, body_hash, saga_state in known["standing"] or ():
        found[request_id] = (booking_id, body_hash, saga_state)
    users, currencies = set(known["users"] or ()), known["events"] or {}
    new: list[Request] = []
    first: dict[tuple[str, str], Request] = {}
    for request in requests:  # arrival order: the first of a user and key makes the booking
        if request.id in found or request.user_id not in users:
            continue
        if request.event_id not in currencies:
            continue
        earlier = first.get((request.user_id, request.key))
        if earlier is None:
            first[(request.user_id, request.key)] = request
            new.append(request)
            earlier = request
        found[request.id] = (earlier.id, earlier.digest, "PENDING")
    return found, new, {r.event_id: currencies[r.event_id] for r in new}


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
