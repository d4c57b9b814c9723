"""Holds: take seats or units for a few minutes, or give them back."""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten import cache, errors, holds, openapi, security
from bilten.errors import ApiError
from bilten.holds import Hold
from bilten.state import state
from bilten.wire import JSONResponse, Struct, read_json

SeatIds = Annotated[list[uuid.UUID], msgspec.Meta(min_length=1, max_length=100)]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=100)]


class HoldIn(Struct, kw_only=True):
    event_id: uuid.UUID
    seat_ids: SeatIds | None = None
    ticket_type_id: uuid.UUID | None = None
    quantity: Quantity | None = None


def what(
    seat_ids: list[uuid.UUID] | None, ticket_type_id: uuid.UUID | None, quantity: int | None
) -> tuple[list[str], str | None, int]:
    """Seats, or a ticket type and a quantity: exactly one of the two."""
    if seat_ids and (ticket_type_id or quantity):
        raise _invalid("seat_ids", "give seat_ids or ticket_type_id with quantity, not both")
    if seat_ids:
        ids = [str(s) for s in seat_ids]
        if len(set(ids)) != len(ids):
            raise _invalid("seat_ids", "a seat is listed twice")
        return ids, None, len(ids)
    if ticket_type_id is None:
        raise _invalid("seat_ids", "give seat_ids, or ticket_type_id with quantity")
    if quantity is None:
        raise _invalid("quantity", "required with ticket_type_id")
    return [], str(ticket_type_id), quantity


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(
        "validation_error",
        f"{field}: {message}",
        {"fields": [{"field": field, "message": message}]},
    )


@openapi.endpoint(
    summary="Hold seats (or general-admission units) for a few minutes: all or nothing.",
    tag="holds",
    body=HoldIn,
    response=Hold,
    status=201,
    auth=True,
    errors=("seat_unavailable", "sold_out", "not_found", "conflict"),
)
async def create_hold(request: Request) -> Response:
    who = security.authenticate(request)
    body = await read_json(request, HoldIn)
    seat_ids, ticket_type_id, quantity = what(body.seat_ids, body.ticket_type_id, body.quantity)
    want = holds.Want(who.user_id, str(body.event_id), seat_ids, ticket_type_id, quantity)
    try:
        hold = await state(request).holding.hold(want)  # batched with others (bilten.holddesk)
    except ApiError as refused:
        # Answered here: in a rush most clicks are refusals, and raising them through the
        # framework's exception layers costs more than answering them.
        return errors.response(refused)
    return JSONResponse(hold, status_code=201)


@openapi.endpoint(
    summary="Release a hold at once.", tag="holds", status=204, auth=True, errors=("not_found",)
)
async def delete_hold(request: Request) -> Response:
    who = security.authenticate(request)
    hold_id = str(request.path_params["hold_id"])
    app = state(request)
    async with app.db.acquire() as conn, conn.transaction():
        owned = await conn.fetchval(
            "SELECT 1 FROM holds WHERE id = $1 AND user_id = $2 AND status = 'active'",
            hold_id,
            who.user_id,
        )
        event_id = await holds.release(conn, hold_id) if owned else None
    if event_id is None:
        raise ApiError("not_found", "No such hold.")
    await cache.changed(app.redis, app.caches, event_id)
    return Response(status_code=204)


routes = [
    Route("/holds", create_hold, methods=["POST"]),
    Route("/holds/{hold_id:uuid}", delete_hold, methods=["DELETE"]),
]
