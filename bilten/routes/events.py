"""Events: create, change, publish, cancel, search, detail, seat map, image."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Annotated

import msgspec
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten import cache, events, media, openapi, ratelimit, seatmap, security, venues
from bilten.errors import ApiError
from bilten.events import Event, EventSummary
from bilten.seatmap import SeatMap
from bilten.state import State, state
from bilten.wire import (
    JSONResponse,
    Ready,
    Struct,
    check_times,
    read_body,
    read_json,
    read_query,
)

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Category = Annotated[str, msgspec.Meta(min_length=1, max_length=50)]
Description = Annotated[str, msgspec.Meta(max_length=20_000)]
When = Annotated[datetime, msgspec.Meta(tz=True)]
Price = Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]
PerOrder = Annotated[int, msgspec.Meta(ge=1, le=100)]
UNSET = msgspec.UNSET
Unset = msgspec.UnsetType


class TierIn(Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=50)]
    price_cents: Price
    sections: Annotated[list[str], msgspec.Meta(min_length=1)]


class TicketTypeIn(Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=50)]
    price_cents: Price
    capacity: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


class NewEvent(Struct, kw_only=True):
    title: Text
    description: Description = ""
    category: Category
    venue_id: uuid.UUID
    starts_at: When
    ends_at: When
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
    sale_starts_at: When | None = None
    max_tickets_per_order: PerOrder = 10
    price_tiers: Annotated[list[TierIn], msgspec.Meta(max_length=50)] = msgspec.field(
        default_factory=list
    )
    ticket_types: Annotated[list[TicketTypeIn], msgspec.Meta(max_length=50)] = msgspec.field(
        default_factory=list
    )


class EventPatch(Struct, kw_only=True):
    title: Text | Unset = UNSET
    description: Description | Unset = UNSET
    category: Category | Unset = UNSET
    starts_at: When | Unset = UNSET
    ends_at: When | Unset = UNSET
    sale_starts_at: When | Unset | None = UNSET
    max_tickets_per_order: PerOrder | Unset = UNSET


Cents = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # what the database's integer holds
Word = Annotated[str, msgspec.Meta(max_length=200)]


class SearchQuery(msgspec.Struct, kw_only=True):
    q: Word | None = None
    category: Word | None = None
    city: Word | None = None
    starts_from: When | None = msgspec.field(default=None, name="from")
    starts_to: When | None = msgspec.field(default=None, name="to")
    min_price: Cents | None = None
    max_price: Cents | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class EventPage(msgspec.Struct, kw_only=True):
    items: list[EventSummary]
    next_cursor: str | None


class Image(msgspec.Struct, kw_only=True):
    image_url: str


SEARCH_PARAMS = (
    ("q", "string", "words to find in title, description, category or city"),
    ("category", "string", "exact category, any case"),
    ("city", "string", "the venue's city, any case"),
    ("from", "string", "events starting at or after this time (RFC 3339)"),
    ("to", "string", "events starting before this time (RFC 3339)"),
    ("min_price", "integer", "some ticket costs at least this (minor units)"),
    ("max_price", "integer", "some ticket costs at most this (minor units)"),
    ("limit", "integer", "page size, 1 to 100 (default 20)"),
    ("cursor", "string", "next_cursor of the previous page"),
)


def _not_found() -> ApiError:
    return ApiError("not_found", "No such event.")


def _may_manage(who: security.Principal, organizer_id: str) -> bool:
    return who.role == "admin" or who.user_id == organizer_id


def _visible(request: Request, status: str, organizer_id: str) -> bool:
    if status != "draft":
        return True
    who = security.optional(request)
    return who is not None and _may_manage(who, organizer_id)


async def _managed(app: State, request: Request) -> tuple[security.Principal, str, str]:
    """The caller, the event id and its status, when the caller may manage the event.

    Someone who may not even see a draft gets 404; someone who sees it but does not own it, 403.
    """
    who = security.authenticate(request)
    event_id = str(request.path_params["event_id"])
    async with app.db.acquire() as conn:
        found = await events.owner_and_status(conn, event_id)
    if found is None:
        raise _not_found()
    organizer_id, status = found
    if not _may_manage(who, organizer_id):
        if status == "draft":
            raise _not_found()
        raise ApiError("forbidden", "Only the event's organizer or an admin may do this.")
    return who, event_id, status


@openapi.endpoint(
    summary="Create a draft event at one of my venues, with its seat inventory (organizers).",
    tag="events",
    body=NewEvent,
    response=Event,
    status=201,
    auth=True,
    errors=("forbidden",),
)
async def create_event(request: Request) -> Response:
    who = security.require(request, "organizer")
    body = await read_json(request, NewEvent)
    check_times(body)
    app = state(request)
    async with app.db.acquire() as conn:
        owner = await venues.owner_of(conn, str(body.venue_id))
        if owner is None:
            raise events.invalid("venue_id", "no such venue")
        if not _may_manage(who, owner):
            raise ApiError("forbidden", "Events can be created only at your own venues.")
        quota: list[ratelimit.Charge] = []
        if who.role != "admin":  # admins are not limited
            quota = [("events", app.settings.quota_events, 1)]
            await ratelimit.take_all(app.redis, who.user_id, quota)
        fields = msgspec.structs.asdict(body)
        fields["price_tiers"] = [msgspec.structs.asdict(t) for t in body.price_tiers]
        fields["ticket_types"] = [msgspec.structs.asdict(t) for t in body.ticket_types]
        try:
            async with conn.transaction():
                event_id = await events.create(conn, who.user_id, str(body.venue_id), fields)
        except BaseException:
            await ratelimit.give_back(app.redis, who.user_id, quota)  # nothing was made
            raise
        event = await events.get(conn, event_id)
    return JSONResponse(event, status_code=201)


@openapi.endpoint(
    summary="Change an event's details (its organizer or an admin).",
    tag="events",
    body=EventPatch,
    response=Event,
    auth=True,
    errors=("not_found", "forbidden", "conflict"),
)
async def patch_event(request: Request) -> Response:
    app = state(request)
    _, event_id, _ = await _managed(app, request)
    patch = await read_json(request, EventPatch)
    check_times(patch)
    changes = {
        f: getattr(patch, f) for f in patch.__struct_fields__ if getattr(patch, f) is not UNSET
    }
    async with app.db.acquire() as conn:
        if not await events.update(conn, event_id, changes):
            raise ApiError("conflict", "A cancelled or completed event cannot change.")
        event = await events.get(conn, event_id)
    await cache.changed(app.redis, app.caches, event_id)
    return JSONResponse(event)


async def _transition(request: Request, to: str) -> Response:
    app = state(request)
    _, event_id, _ = await _managed(app, request)
    async with app.db.acquire() as conn:
        was = await events.transition(conn, event_id, to)
        if was is not None:
            raise ApiError(
                "conflict", f"A {was} event cannot become {to}.", {"status": was, "to": to}
            )
        event = await events.get(conn, event_id)
    await cache.changed(app.redis, app.caches, event_id)
    return JSONResponse(event)


@openapi.endpoint(
    summary="Publish a draft event: it becomes visible and on sale.",
    tag="events",
    response=Event,
    auth=True,
    errors=("not_found", "forbidden", "conflict"),
)
async def publish_event(request: Request) -> Response:
    return await _transition(request, "published")


@openapi.endpoint(
    summary="Cancel an event.",
    tag="events",
    response=Event,
    auth=True,
    errors=("not_found", "forbidden", "conflict"),
)
async def cancel_event(request: Request) -> Response:
    return await _transition(request, "cancelled")


@openapi.endpoint(
    summary="Search published events (and my drafts), in start order, page by page.",
    tag="events",
    response=EventPage,
    query=SEARCH_PARAMS,
    errors=("validation_error",),
)
async def list_events(request: Request) -> Response:
    query = read_query(request, SearchQuery)
    check_times(query)
    who = security.optional(request)
    async with state(request).db.acquire() as conn:
        items, next_cursor = await events.search(
            conn, viewer_id=who.user_id if who else None, **msgspec.structs.asdict(query)
        )
    return JSONResponse(EventPage(items=items, next_cursor=next_cursor))


@openapi.endpoint(
    summary="An event with its tiers, ticket types and availability.",
    tag="events",
    response=Event,
    errors=("not_found",),
)
async def get_event(request: Request) -> Response:
    found = await seatmap.detail(state(request), str(request.path_params["event_id"]))
    if found is None or not _visible(request, found.status, found.organizer_id):
        raise _not_found()
    return Ready(found.body, found.headers)


def _not_modified(if_none_match: str, etag: str) -> bool:
    """If-None-Match compares weakly (RFC 9110): a proxy that compressed the body may have
    marked the tag weak, and the client sends it back so."""
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in tags or "*" in tags


@openapi.endpoint(
    summary="The seat map: every seat with its status, tier and price.",
    tag="events",
    response=SeatMap,
    errors=("not_found",),
    extra_responses={304: "Not modified since the version in If-None-Match."},
    description="`version` moves with every change; the ETag is the version.",
)
async def get_seats(request: Request) -> Response:
    found = await seatmap.seat_map(state(request), str(request.path_params["event_id"]))
    if found is None or not _visible(request, found.status, found.organizer_id):
        raise _not_found()
    if _not_modified(request.headers.get("if-none-match", ""), found.etag):
        return Ready(b"", found.tag_headers, 304)
    return Ready(found.body, found.headers)


async def _uploaded_file(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError("bad_request", "Send the image as multipart/form-data, field 'file'.")
    # The whole body may carry a little multipart framing beyond the file itself.
    body = await read_body(request, media.MAX_UPLOAD_BYTES + 64 * 1024)

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=10).parse()
    except MultiPartException as exc:
        raise ApiError("bad_request", f"Malformed multipart body: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise events.invalid("file", "a file field named 'file' is required")
        data = await upload.read()
    finally:
        await form.close()  # any file of another name is spooled too
    if len(data) > media.MAX_UPLOAD_BYTES:
        raise ApiError("payload_too_large", f"Images are at most {media.MAX_UPLOAD_BYTES} bytes.")
    return data


@openapi.endpoint(
    summary="Upload the event's image (JPEG, PNG or WebP, at most 5 MB; multipart field 'file').",
    tag="events",
    response=Image,
    status=201,
    auth=True,
    errors=(
        "not_found",
        "forbidden",
        "payload_too_large",
        "unsupported_media_type",
        "validation_error",
        "bad_request",
    ),
)
async def upload_image(request: Request) -> Response:
    app = state(request)
    _, event_id, _ = await _managed(app, request)
    data = await _uploaded_file(request)
    name, encoded = await asyncio.to_thread(media.reencode, data)
    await app.media.put(name, encoded)
    url = f"/media/{name}"
    async with app.db.acquire() as conn:
        await events.set_image(conn, event_id, url)
    await cache.changed(app.redis, app.caches, event_id)
    return JSONResponse(Image(image_url=url), status_code=201)


@openapi.endpoint(
    summary="A stored image; its name is its content hash, so it may be cached forever.",
    tag="media",
    content_type="image/*",
    errors=("not_found",),
)
async def get_media(request: Request) -> Response:
    name = request.path_params["name"]
    data = await state(request).media.get(name)
    if data is None:
        raise ApiError("not_found", "No such image.")
    return Response(
        data,
        media_type=media.CONTENT_TYPES[name.rsplit(".", 1)[1]],
        headers={
            "Cache-Control": "public, max-age=31536000, immutable",
            "ETag": f'"{name.split(".")[0]}"',
        },
    )


routes = [
    Route("/events", create_event, methods=["POST"]),
    Route("/events", list_events, methods=["GET"]),
    Route("/events/{event_id:uuid}", get_event, methods=["GET"]),
    Route("/events/{event_id:uuid}", patch_event, methods=["PATCH"]),
    Route("/events/{event_id:uuid}/publish", publish_event, methods=["POST"]),
    Route("/events/{event_id:uuid}/cancel", cancel_event, methods=["POST"]),
    Route("/events/{event_id:uuid}/seats", get_seats, methods=["GET"]),
    Route("/events/{event_id:uuid}/image", upload_image, methods=["POST"]),
    Route("/media/{name}", get_media, methods=["GET"]),
]
