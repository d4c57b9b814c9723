"""Venues: organizers describe their halls once, seat by seat; events reuse the layout."""

from __future__ import annotations

import uuid
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten import openapi, ratelimit, security, venues
from bilten.errors import ApiError
from bilten.state import state
from bilten.venues import Venue
from bilten.wire import JSONResponse, Struct, read_json

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=20)]
Coordinate = Annotated[float, msgspec.Meta(ge=-1e6, le=1e6)]


class RowIn(Struct, kw_only=True):
    label: Label
    seats: Annotated[int, msgspec.Meta(ge=1, le=1000)]


class SectionIn(Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=50)]
    rows: Annotated[list[RowIn], msgspec.Meta(min_length=1, max_length=500)]
    # Bounded so that every seat's coordinates fit the database's real columns.
    x: Coordinate | None = None
    y: Coordinate | None = None


class NewVenue(Struct, kw_only=True):
    name: Text
    address: Text
    city: Text
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
    timezone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    sections: Annotated[list[SectionIn], msgspec.Meta(min_length=1, max_length=200)]


@openapi.endpoint(
    summary="Create a venue with its sections, rows and seats (organizers).",
    tag="venues",
    body=NewVenue,
    response=Venue,
    status=201,
    auth=True,
    errors=("forbidden",),
)
async def create_venue(request: Request) -> Response:
    who = security.require(request, "organizer")
    body = await read_json(request, NewVenue)
    try:
        ZoneInfo(body.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ApiError(
            "validation_error",
            "timezone: not an IANA time zone",
            {"fields": [{"field": "timezone", "message": "not an IANA time zone"}]},
        ) from None
    app = state(request)
    seats = sum(row.seats for section in body.sections for row in section.rows)
    quota: list[ratelimit.Charge] = []
    # Admins are not limited; a venue past the size limit is refused below, not counted.
    if who.role != "admin" and seats <= venues.MAX_SEATS:
        quota = [
            ("venues", app.settings.quota_venues, 1),
            ("venue_seats", app.settings.quota_seats, seats),
        ]
        await ratelimit.take_all(app.redis, who.user_id, quota)
    try:
        async with app.db.acquire() as conn:
            venue_id = await venues.create(conn, who.user_id, msgspec.to_builtins(body))
            venue = await venues.get(conn, venue_id)
    except BaseException:
        await ratelimit.give_back(app.redis, who.user_id, quota)  # nothing was made
        raise
    return JSONResponse(venue, status_code=201)


@openapi.endpoint(
    summary="A venue and its layout.", tag="venues", response=Venue, errors=("not_found",)
)
async def get_venue(request: Request) -> Response:
    venue_id: uuid.UUID = request.path_params["venue_id"]
    async with state(request).db.acquire() as conn:
        venue = await venues.get(conn, str(venue_id))
    if venue is None:
        raise ApiError("not_found", "No such venue.")
    return JSONResponse(venue)


routes = [
    Route("/venues", create_venue, methods=["POST"]),
    Route("/venues/{venue_id:uuid}", get_venue, methods=["GET"]),
]
