"""Bookings: requests into the event's queue, their outcome, reads, cancellation, webhooks."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten import bookings, errors, holds, keys, openapi, queue, seatmap, security
from bilten.bookings import Booking, Failure
from bilten.errors import ApiError
from bilten.payments import webhooks
from bilten.routes.holds import Quantity, SeatIds, what
from bilten.sagas import booking as saga
from bilten.state import State, state
from bilten.wire import JSONResponse, Struct, decode, header, read_body, read_json, read_query

MAX_WAIT = 30.0
WEBHOOK_MAX_BYTES = 256 * 1024  # Stripe's events are a few KB; anything larger is refused (413)
OUTCOME_ERRORS = (
    "seat_unavailable",
    "sold_out",
    "hold_expired",
    "payment_declined",
    "idempotency_mismatch",
    "not_found",
    "unavailable",
)
# RFC 7240: preference names in any case, optional spaces around "=", the value maybe quoted.
_PREFER_WAIT = re.compile(
    r'(?:^|[;,\s])wait\s*=\s*"?([0-9]{1,9}(?:\.[0-9]{1,9})?)"?(?:$|[;,\s])', re.I
)


class PaymentIn(Struct, kw_only=True):
    method: Literal["card"]
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class BookingIn(Struct, kw_only=True):
    event_id: uuid.UUID
    hold_id: uuid.UUID | None = None
    seat_ids: SeatIds | None = None
    ticket_type_id: uuid.UUID | None = None
    quantity: Quantity | None = None
    payment: PaymentIn


class Queued(msgspec.Struct, kw_only=True):
    request_id: str
    status: Literal["queued", "processing"]
    position: int


class Confirmed(msgspec.Struct, kw_only=True):
    request_id: str
    status: Literal["confirmed"]
    booking: Booking


class RequestStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    status: Literal["queued", "processing", "confirmed", "failed", "cancelled"]
    position: int | None = None
    booking_id: str | None = None
    error: Failure | None = None


class BookingPage(msgspec.Struct, kw_only=True):
    items: list[Booking]
    next_cursor: str | None


class BookingQuery(msgspec.Struct, kw_only=True):
    status: Literal["pending", "confirmed", "failed", "cancelled"] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class Received(msgspec.Struct, kw_only=True):
    received: bool
    duplicate: bool = False


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _idempotency_key(request: Request) -> str:
    """The header's value without the spaces and tabs around it (only those: a key of other
    characters is the client's to choose, and compared as sent); no control characters."""
    key = (header(request, b"idempotency-key") or "").strip(" \t")
    if not key or len(key) > 200 or _CONTROL.search(key):
        raise ApiError(
            "validation_error",
            "Idempotency-Key: a header of 1 to 200 characters, none of them control "
            "characters, is required",
            {"fields": [{"field": "Idempotency-Key", "message": "required header"}]},
        )
    return key


def _wait_seconds(request: Request, default: float) -> float:
    """``Prefer: wait=N`` (capped at MAX_WAIT), from any of the request's Prefer headers."""
    if header(request, b"prefer") is None:
        return default
    prefer = b",".join(v for k, v in request.scope["headers"] if k.lower() == b"prefer")
    match = _PREFER_WAIT.search(prefer.decode("latin-1"))
    return min(float(match[1]), MAX_WAIT) if match else default


def _failure(failure: Failure, request_id: str, booking_id: str) -> Response:
    details = {**failure.details, "request_id": request_id, "booking_id": booking_id}
    headers = {"Retry-After": "5"} if failure.code == "unavailable" else None
    return errors.response(ApiError(failure.code, failure.message, details, headers=headers))


async def _answer(app: State, booking_id: str, user_id: str, request_id: str) -> Response | None:
    """The final answer for a finished booking, read from the database; None while pending."""
    async with app.db.acquire() as conn:
        found = await bookings.get(conn, booking_id, user_id)
    if found is None or found.status == "pending":
        return None
    if found.status == "confirmed":
        return JSONResponse(
            Confirmed(request_id=request_id, status="confirmed", booking=found), status_code=201
        )
    failure = found.failure or Failure(code="conflict", message=f"The booking is {found.status}.")
    return _failure(failure, request_id, booking_id)


async def _answer_from(
    app: State, outcome: bytes, user_id: str, request_id: str
) -> Response | None:
    """The answer a worker announced; what it left out is read from the database."""
    if outcome:
        done = _decode_done(outcome)
        if done.status == "confirmed" and done.booking is not None:
            return JSONResponse(
                Confirmed(request_id=done.request_id, status="confirmed", booking=done.booking),
                status_code=201,
            )
        if done.status == "failed" and done.error is not None:
            return _failure(done.error, done.request_id, done.booking_id)
        if done.booking_id != request_id:
            return await _answer(app, done.booking_id, user_id, request_id)
    return await _answer(app, request_id, user_id, request_id)


_decode_done = msgspec.json.Decoder(bookings.Done).decode


async def _queued(app: State, request_id: str, event_id: str, user_id: str) -> Response:
    """The request's answer as far as it is known: its outcome (from its status, or from the
    database when the outcome's message was missed), else 202 with its place in the queue."""
    raw: Any = await app.pipeline.command("HGETALL", keys.booking_request(request_id))
    if b"result" in raw:
        answer = await _answer_from(app, raw[b"result"], user_id, request_id)
    else:
        booking_id = raw.get(b"booking_id", request_id.encode()).decode()
        answer = await _answer(app, booking_id, user_id, request_id)
    if answer is not None:
        return answer
    status = raw.get(b"status", b"queued").decode()
    ticket = int(raw.get(b"ticket", 0))
    position = await queue.position(app.pipeline, event_id, ticket) if ticket else 0
    return JSONResponse(
        Queued(
            request_id=request_id,
            status="processing" if status == "processing" else "queued",
            position=position,
        ),
        status_code=202,
    )


async def _order_limit(app: State, event_id: str) -> int:
    """The event's tickets-per-order limit; 404 unless the event is visible. A published
    event is remembered for a few seconds (the worker checks it again, so an event cancelled
    meanwhile still sells nothing)."""
    limit = await app.caches.on_sale.get_or_load(event_id, lambda: _event_limit(app, event_id))
    if limit is None:
        raise ApiError("not_found", "No such event.")
    return limit


async def _event_limit(app: State, event_id: str) -> int | None:
    """The limit of a visible event (drafts are not), else None."""
    row = await app.db.fetchrow(
        "SELECT status, max_tickets_per_order FROM events WHERE id = $1", event_id
    )
    if row is None or row["status"] == "draft":
        return None
    limit: int = row["max_tickets_per_order"]
    if row["status"] == "published":
        app.caches.on_sale.put(event_id, limit)
    return limit


async def _seat_ids(app: State, event_id: str) -> frozenset[str]:
    """The event's seat ids, loaded once per process and kept: an event's seats never change."""
    return await app.caches.seat_ids.get_or_load(event_id, lambda: _load_seat_ids(app, event_id))


async def _load_seat_ids(app: State, event_id: str) -> frozenset[str]:
    rows = await app.db.fetch("SELECT seat_id::text FROM event_seats WHERE event_id = $1", event_id)
    ids = frozenset(r["seat_id"] for r in rows)
    app.caches.seat_ids.put(event_id, ids)
    return ids


async def _units_left(app: State, event_id: str, ticket_type_id: str) -> int:
    """What is left of a ticket type as this process's catalog cache has it (-1: not known);
    422 if the event has no such type. The cache is dropped whenever any instance changes the
    event's units (the outbox relay announces it), so after a sell-out the door keeps refusing
    until units come back; the worker still decides."""
    found = await seatmap.detail(app, event_id)
    if found is None:
        return -1
    left = found.units_left.get(ticket_type_id)
    if left is None:  # every type of the event is there
        raise holds.unknown_ticket_type()
    return left


async def _check_hold(app: State, event_id: str, hold_id: str, user_id: str) -> None:
    """404 at the door for a hold that is not one of the caller's on this event: it would take
    a place in the queue only to fail there. Whether it is still active is left to the worker
    (holds are never deleted, so a retry of a booking that used its hold still finds it)."""
    found = await app.db.fetchval(
        "SELECT 1 FROM holds WHERE id = $1 AND user_id = $2 AND event_id = $3",
        hold_id,
        user_id,
        event_id,
    )
    if found is None:
        raise ApiError("not_found", "No such hold.")


async def _book(request: Request, default_wait: float) -> Response:
    who = security.authenticate(request)
    key = _idempotency_key(request)
    body = await read_json(request, BookingIn)
    if body.hold_id is not None and (body.seat_ids or body.ticket_type_id or body.quantity):
        raise ApiError(
            "validation_error",
            "hold_id: give a hold, or seats, or a ticket type with a quantity",
            {"fields": [{"field": "hold_id", "message": "only one way to say what to book"}]},
        )
    wanted: dict[str, Any] = {}
    if body.hold_id is not None:
        wanted["hold_id"] = str(body.hold_id)
    else:
        seat_ids, ticket_type_id, quantity = what(body.seat_ids, body.ticket_type_id, body.quantity)
        wanted = {"seat_ids": seat_ids, "ticket_type_id": ticket_type_id, "quantity": quantity}
    wait = _wait_seconds(request, default_wait)
    app = state(request)
    event_id = str(body.event_id)
    limit = await _order_limit(app, event_id)
    # Refused here, it takes no seat and no place in the queue (a hold was limited when made).
    if body.hold_id is None and wanted["quantity"] > limit:
        raise holds.over_order_limit(limit, bool(wanted["seat_ids"]))
    units_left = -1
    if wanted.get("seat_ids"):
        known = await _seat_ids(app, event_id)
        unknown = [s for s in wanted["seat_ids"] if s not in known]
        if unknown:
            raise holds.not_seats_of_event(unknown)
    elif wanted.get("ticket_type_id"):
        units_left = await _units_left(app, event_id, wanted["ticket_type_id"])
    else:
        await _check_hold(app, event_id, wanted["hold_id"], who.user_id)
    entry = queue.Request(
        id=queue.new_request_id(event_id),
        user_id=who.user_id,
        event_id=event_id,
        key=key,
        digest=bookings.body_hash(body),
        request=wanted,
        provider=app.payments.name,
        token=body.payment.token,
    )
    # Parked before the request is queued, so an outcome that comes quickly is not missed.
    future = app.waiters.register(entry.id) if wait > 0 else None
    try:
        submitted = await queue.submit(app.pipeline, entry, app.settings.queue_max, units_left)
        if isinstance(submitted, queue.Known):
            if submitted.digest != entry.digest:
                raise bookings.key_reused(key)
            first = msgspec.structs.replace(entry, id=submitted.request_id)
            return await _repeat(app, who.user_id, first, wait)
        if future is not None:
            answer = await _outcome(app, future, wait, who.user_id, entry.id)
            if answer is not None:
                return answer
        # On record in PostgreSQL before a 202: Redis alone may lose the request. Should this
        # fail (503), the request may still be booked; a retry with its key finds it.
        await app.intake.record(entry.id, queue.encode_request(entry))
        if future is not None:
            return await _queued(app, entry.id, event_id, who.user_id)
        return JSONResponse(
            Queued(request_id=entry.id, status="queued", position=submitted), status_code=202
        )
    finally:
        if future is not None:
            app.waiters.discard(entry.id, future)


async def _outcome(
    app: State, future: asyncio.Future[bytes | None], wait: float, user_id: str, request_id: str
) -> Response | None:
    """The final answer, if the request's outcome is known within ``wait`` seconds. A request
    answered so needs no record in PostgreSQL: its booking (or its refusal) is final there or
    in the announcement; only a 202 is a promise. (A timer resolves the future with None:
    ``asyncio.wait_for`` around a shield costs a booking some 15 µs more.)"""
    timer = asyncio.get_running_loop().call_later(wait, _no_outcome, future)
    try:
        outcome = await future
    finally:
        timer.cancel()
    return None if outcome is None else await _answer_from(app, outcome, user_id, request_id)


def _no_outcome(future: asyncio.Future[bytes | None]) -> None:
    if not future.done():
        future.set_result(None)


async def _repeat(app: State, user_id: str, known: queue.Request, wait: float) -> Response:
    """A request made again with its Idempotency-Key (``known``: the first one, as it was
    queued): the first one's answer, when known. Until then it is made sure of as the first
    time: its event among the active queues, and on record in PostgreSQL before a 202, in case
    what came after its queueing failed then (an outage: the first answer was 503)."""
    request_id, event_id = known.id, known.event_id
    future = app.waiters.register(request_id) if wait > 0 else None
    try:
        status = await app.pipeline.command("HGETALL", keys.booking_request(request_id))
        if b"result" not in status:
            await app.pipeline.command("SADD", keys.QUEUE_ACTIVE, event_id)
            answer = await _outcome(app, future, wait, user_id, request_id) if future else None
            if answer is not None:
                return answer
            await app.intake.record(request_id, queue.encode_request(known))
        return await _queued(app, request_id, event_id, user_id)
    finally:
        if future is not None:
            app.waiters.discard(request_id, future)


@openapi.endpoint(
    summary="Ask to book: the request joins the event's queue (202), or with `Prefer: wait=N` "
    "the answer comes when the outcome is known.",
    tag="bookings",
    body=BookingIn,
    response=Queued,
    status=202,
    auth=True,
    errors=OUTCOME_ERRORS,
    extra_responses={201: "Confirmed (with Prefer: wait=N)."},
    description="Header Idempotency-Key is required: the same key and body return the same "
    "request; the same key with another body is 422 idempotency_mismatch.",
)
async def create_booking(request: Request) -> Response:
    return await _answered(_book(request, 0.0))


@openapi.endpoint(
    summary="Book and wait for the outcome (POST /bookings with Prefer: wait=30).",
    tag="bookings",
    body=BookingIn,
    response=Confirmed,
    status=201,
    auth=True,
    errors=OUTCOME_ERRORS,
    extra_responses={202: "Still queued after 30 seconds."},
)
async def purchase(request: Request) -> Response:
    return await _answered(_book(request, MAX_WAIT))


async def _answered(booking: Awaitable[Response]) -> Response:
    """Refusals answered here: in a sale they are most answers, and raising them through the
    framework's exception layers costs more than answering them."""
    try:
        return await booking
    except ApiError as error:
        return errors.response(error)


@openapi.endpoint(
    summary="Where a booking request stands.",
    tag="bookings",
    response=RequestStatus,
    auth=True,
    errors=("not_found",),
)
async def request_status(request: Request) -> Response:
    who = security.authenticate(request)
    request_id = str(request.path_params["request_id"])
    app = state(request)
    raw: Any = await app.pipeline.command("HGETALL", keys.booking_request(request_id))
    booking_id = raw.get(b"booking_id", request_id.encode()).decode()
    owner = raw.get(b"user_id", b"").decode()
    if not owner:  # its status expired, or was rewritten without it: the record decides
        async with app.db.acquire() as conn:
            owner = await bookings.request_owner(conn, request_id, booking_id) or ""
    if not owner or (owner != who.user_id and who.role != "admin"):
        raise ApiError("not_found", "No such booking request.")
    status = raw.get(b"status", b"").decode()
    if b"result" in raw:
        done = _decode_done(raw[b"result"])
        return JSONResponse(
            RequestStatus(
                request_id=request_id,
                status=done.status,
                booking_id=done.booking_id,
                error=done.error,
            )
        )
    # A request that stands for an earlier booking (its key seen again) follows that booking.
    if status in ("queued", "processing") and booking_id == request_id and b"event_id" in raw:
        event_id = raw[b"event_id"].decode()
        ticket = int(raw.get(b"ticket", 0))
        return JSONResponse(
            RequestStatus(
                request_id=request_id,
                status="queued" if status == "queued" else "processing",
                position=await queue.position(app.pipeline, event_id, ticket),
            )
        )
    async with app.db.acquire() as conn:
        found = await bookings.get(conn, booking_id, None if who.role == "admin" else who.user_id)
    if found is None and (status in ("queued", "processing") or not raw):
        # Accepted (its owner was found on record) and not a booking yet: it waits its turn.
        return JSONResponse(RequestStatus(request_id=request_id, status="queued"))
    if found is None:
        raise ApiError("not_found", "No such booking request.")
    return JSONResponse(
        RequestStatus(
            request_id=request_id,
            status="processing" if found.status == "pending" else found.status,
            booking_id=found.id,
            error=found.failure,
        )
    )


@openapi.endpoint(
    summary="One of my bookings (admins: any).",
    tag="bookings",
    response=Booking,
    auth=True,
    errors=("not_found",),
)
async def get_booking(request: Request) -> Response:
    who = security.authenticate(request)
    async with state(request).db.acquire() as conn:
        found = await bookings.get(
            conn,
            str(request.path_params["booking_id"]),
            None if who.role == "admin" else who.user_id,
        )
    if found is None:
        raise ApiError("not_found", "No such booking.")
    return JSONResponse(found)


@openapi.endpoint(
    summary="My bookings, newest first.",
    tag="bookings",
    response=BookingPage,
    auth=True,
    query=(
        ("status", "string", "pending, confirmed, failed or cancelled"),
        ("limit", "integer", "page size, 1 to 100 (default 20)"),
        ("cursor", "string", "next_cursor of the previous page"),
    ),
)
async def list_bookings(request: Request) -> Response:
    who = security.authenticate(request)
    query = read_query(request, BookingQuery)
    async with state(request).db.acquire() as conn:
        items, next_cursor = await bookings.list_for(
            conn, who.user_id, query.status, query.limit, query.cursor
        )
    return JSONResponse(BookingPage(items=items, next_cursor=next_cursor))


@openapi.endpoint(
    summary="Cancel a confirmed booking: seats released, tickets void, the payment refunded.",
    tag="bookings",
    response=Booking,
    auth=True,
    errors=("not_found", "conflict", "unavailable"),
    description="Refused with 409 conflict, details.reason checked_in, event_started or "
    "already_cancelled, once a ticket was used, the event has begun, or it was cancelled "
    "before. The refund is carried out after the cancel is recorded: the booking reads "
    "payment.status refunding until the provider confirms it (then refunded).",
)
async def cancel_booking(request: Request) -> Response:
    who = security.authenticate(request)
    booking_id = str(request.path_params["booking_id"])
    app = state(request)
    async with app.db.acquire() as conn:
        found = await bookings.owner(conn, booking_id)
    if found is None or (found[0] != who.user_id and who.role != "admin"):
        raise ApiError("not_found", "No such booking.")
    outcome = await saga.cancel(app, booking_id)
    async with app.db.acquire() as conn:
        cancelled = await bookings.get(conn, booking_id)
    assert cancelled is not None
    seat_ids = [i.seat_id for i in cancelled.items if i.seat_id]
    await queue.release_claims(app.redis, cancelled.event_id, seat_ids)
    await saga.announce(app, outcome)
    return JSONResponse(cancelled)


@openapi.endpoint(
    summary="Payment provider callbacks (Stripe-Signature verified; redelivery ignored).",
    tag="payments",
    response=Received,
    errors=("bad_request", "not_found"),
)
async def webhook(request: Request) -> Response:
    app = state(request)
    if request.path_params["provider"] != "stripe" or not app.settings.stripe_webhook_secret:
        raise ApiError("not_found", "No webhooks for this provider.")
    payload = await read_body(request, WEBHOOK_MAX_BYTES)
    try:
        webhooks.verify_stripe_signature(
            payload, request.headers.get("stripe-signature"), app.settings.stripe_webhook_secret
        )
    except webhooks.InvalidSignature as exc:
        raise ApiError("bad_request", f"Invalid webhook signature: {exc}") from None
    event = decode(payload, webhooks.Event)
    event_id, kind = event.id, event.type
    seen = "SELECT 1 FROM payment_webhook_events WHERE id = $1"
    if await app.db.fetchval(seen, event_id):
        return JSONResponse(Received(received=True, duplicate=True))
    # Applied first, recorded after: applying is idempotent (each step is guarded by the
    # booking's state), so a crash between the two only means the provider's retry applies it
    # again, where recording first would have let that retry be skipped as a duplicate.
    await saga.apply_webhook(app, kind, event.data.object)
    recorded = await app.db.fetchval(
        """INSERT INTO payment_webhook_events (id, provider, type) VALUES ($1, 'stripe', $2)
           ON CONFLICT DO NOTHING RETURNING true""",
        event_id,
        kind,
    )
    if not recorded:  # a delivery of the same event at the same moment, applied as well
        return JSONResponse(Received(received=True, duplicate=True))
    return JSONResponse(Received(received=True))


door = [Route("/bookings", create_booking, methods=["POST"])]
routes = [
    Route("/bookings", list_bookings, methods=["GET"]),
    Route("/bookings/requests/{request_id:uuid}", request_status, methods=["GET"]),
    Route("/bookings/{booking_id:uuid}", get_booking, methods=["GET"]),
    Route("/bookings/{booking_id:uuid}/cancel", cancel_booking, methods=["POST"]),
    Route("/tickets/purchase", purchase, methods=["POST"]),
    Route("/payments/webhooks/{provider}", webhook, methods=["POST"]),
]
