"""Tickets, their QR codes, check-in at the door, the events' verification keys, and stats."""

from __future__ import annotations

import functools
import io
from datetime import datetime
from typing import Annotated, Literal

import msgspec
import segno
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten import analytics, metrics, openapi, security, ticketcodes, tickets
from bilten.analytics import EventStats
from bilten.errors import ApiError
from bilten.state import state
from bilten.tickets import Ticket
from bilten.wire import JSONResponse, Struct, read_json, read_query


class TicketPage(msgspec.Struct, kw_only=True):
    items: list[Ticket]
    next_cursor: str | None


class PageQuery(msgspec.Struct, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class CheckInBody(Struct, kw_only=True):
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=400)]


class CheckedIn(msgspec.Struct, kw_only=True):
    ticket: Ticket
    checked_in_at: datetime


class TicketKey(msgspec.Struct, kw_only=True):
    event_id: str
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str  # raw 32 bytes, base64url without padding
    code_format: str = (
        "base64url(ticket id (16 bytes) || event id (16 bytes) || Ed25519 signature (64 bytes) "
        "of the first 32 bytes)"
    )


def _not_found() -> ApiError:
    return ApiError("not_found", "No such ticket.")


async def _visible_ticket(request: Request) -> Ticket:
    who = security.authenticate(request)
    async with state(request).db.acquire() as conn:
        found = await tickets.get(conn, str(request.path_params["ticket_id"]))
    if found is None:
        raise _not_found()
    ticket, holder, organizer = found
    if who.role != "admin" and who.user_id not in (holder, organizer):
        raise _not_found()
    return ticket


@openapi.endpoint(
    summary="My tickets, newest first.",
    tag="tickets",
    response=TicketPage,
    auth=True,
    query=(
        ("limit", "integer", "page size, 1 to 100 (default 20)"),
        ("cursor", "string", "next_cursor of the previous page"),
    ),
)
async def list_tickets(request: Request) -> Response:
    who = security.authenticate(request)
    query = read_query(request, PageQuery)
    async with state(request).db.acquire() as conn:
        items, next_cursor = await tickets.list_for(conn, who.user_id, query.limit, query.cursor)
    return JSONResponse(TicketPage(items=items, next_cursor=next_cursor))


@openapi.endpoint(
    summary="A ticket (its holder, the event's organizer, or an admin).",
    tag="tickets",
    response=Ticket,
    auth=True,
    errors=("not_found",),
)
async def get_ticket(request: Request) -> Response:
    return JSONResponse(await _visible_ticket(request))


@openapi.endpoint(
    summary="The QR code of a ticket's signed code.",
    tag="tickets",
    content_type="image/svg+xml",
    auth=True,
    errors=("not_found",),
)
async def ticket_qr(request: Request) -> Response:
    ticket = await _visible_ticket(request)
    # A ticket's code never changes: its picture may be kept (by this browser only).
    return Response(
        qr_svg(ticket.code),
        media_type="image/svg+xml",
        headers={"Cache-Control": "private, max-age=86400"},
    )


@functools.lru_cache(maxsize=2048)
def qr_svg(code: str) -> bytes:
    """A code's QR picture, drawn on first request only (about 2 ms, on the event loop; about
    3 KB each). A fixed mask scans as well and costs a quarter of searching for the best."""
    out = io.BytesIO()
    segno.make(code, error="m", mask=0).save(out, kind="svg", scale=4, border=2, xmldecl=False)
    return out.getvalue()


@openapi.endpoint(
    summary="Check a ticket in at the door (the event's organizer or an admin).",
    tag="tickets",
    body=CheckInBody,
    response=CheckedIn,
    auth=True,
    errors=("not_found", "forbidden", "already_checked_in"),
    description="The code's signature is checked first: a forged or altered code is 404, as is "
    "a void ticket; a second scan is 409 already_checked_in with the first scan's time.",
)
async def check_in(request: Request) -> Response:
    who = security.authenticate(request)
    body = await read_json(request, CheckInBody)
    app = state(request)
    parsed = ticketcodes.parse(body.code.strip())
    if parsed is None:
        metrics.CHECK_INS.labels("forged").inc()
        raise _not_found()
    async with app.db.acquire() as conn:
        key = await ticketcodes.public_key(conn, parsed.event_id)
        if key is None or not ticketcodes.verify(key, parsed):
            metrics.CHECK_INS.labels("forged").inc()
            raise _not_found()
        organizer = await conn.fetchval(
            "SELECT organizer_id::text FROM events WHERE id = $1", parsed.event_id
        )
        if who.role != "admin" and who.user_id != organizer:
            raise ApiError("forbidden", "Only the event's organizer or an admin checks tickets in.")
        row = await tickets.check_in(conn, parsed.ticket_id, parsed.event_id)
        if row is None:
            found = await tickets.get(conn, parsed.ticket_id)
            if found is not None and found[0].status == "checked_in":
                metrics.CHECK_INS.labels("repeat").inc()
                at = found[0].checked_in_at
                first = at.isoformat() if at else None
                raise ApiError(
                    "already_checked_in",
                    f"This ticket was checked in at {first}.",
                    {"checked_in_at": first, "ticket_id": found[0].id},
                )
            metrics.CHECK_INS.labels("void").inc()
            raise ApiError("not_found", "No valid ticket with this code (void or unknown).")
    metrics.CHECK_INS.labels("ok").inc()
    ticket = Ticket(**{k: row[k] for k in Ticket.__struct_fields__})
    assert ticket.checked_in_at is not None
    return JSONResponse(CheckedIn(ticket=ticket, checked_in_at=ticket.checked_in_at))


@openapi.endpoint(
    summary="The event's public key that verifies its ticket codes (for scanner apps).",
    tag="tickets",
    response=TicketKey,
    errors=("not_found",),
)
async def ticket_key(request: Request) -> Response:
    event_id = str(request.path_params["event_id"])
    async with state(request).db.acquire() as conn:
        status = await conn.fetchval("SELECT status FROM events WHERE id = $1", event_id)
        if status is None or status == "draft":
            raise ApiError("not_found", "No such event.")
        key = await ticketcodes.public_key(conn, event_id)
        if key is None:
            private = await ticketcodes.private_key(conn, state(request).keyring, event_id)
            key = private.public_key().public_bytes_raw()
    return JSONResponse(TicketKey(event_id=event_id, public_key=ticketcodes.b64(key)))


@openapi.endpoint(
    summary="Sales of an event: tickets, revenue, by tier, check-ins, per minute (organizer).",
    tag="events",
    response=EventStats,
    auth=True,
    errors=("not_found", "forbidden"),
)
async def event_stats(request: Request) -> Response:
    who = security.authenticate(request)
    event_id = str(request.path_params["event_id"])
    async with state(request).db.acquire() as conn:
        event = await conn.fetchrow(
            "SELECT organizer_id::text, status, currency FROM events WHERE id = $1", event_id
        )
        if event is None:
            raise ApiError("not_found", "No such event.")
        if who.role != "admin" and who.user_id != event["organizer_id"]:
            if event["status"] == "draft":
                raise ApiError("not_found", "No such event.")
            raise ApiError("forbidden", "Only the event's organizer or an admin sees its sales.")
        stats = await analytics.event_stats(conn, event_id, event["currency"])
    return JSONResponse(stats)


routes = [
    Route("/tickets", list_tickets, methods=["GET"]),
    Route("/tickets/check-in", check_in, methods=["POST"]),
    Route("/tickets/{ticket_id:uuid}", get_ticket, methods=["GET"]),
    Route("/tickets/{ticket_id:uuid}/qr.svg", ticket_qr, methods=["GET"]),
    Route("/events/{event_id:uuid}/ticket-key", ticket_key, methods=["GET"]),
    Route("/events/{event_id:uuid}/stats", event_stats, methods=["GET"]),
]
