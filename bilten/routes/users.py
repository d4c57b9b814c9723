"""The signed-in user's profile and addresses (another user's address is always a 404),
and an organizer's own events and venues."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten import events, openapi, security, users, venues
from bilten.errors import ApiError
from bilten.events import OwnEvent
from bilten.state import state
from bilten.users import Address, Profile
from bilten.venues import VenueSummary
from bilten.wire import JSONResponse, Struct, read_json, read_query

Name = users.Name
Phone = Annotated[str, msgspec.Meta(pattern=r"^\+[1-9][0-9]{6,14}$")]
Locale = Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2}(-[A-Z]{2})?$")]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
UNSET = msgspec.UNSET
Unset = msgspec.UnsetType


class ProfilePatch(Struct, kw_only=True):
    name: Name | Unset = UNSET
    phone: Phone | Unset | None = UNSET  # null clears it
    locale: Locale | Unset | None = UNSET


class NewAddress(Struct, kw_only=True):
    label: Text
    line1: Text
    line2: Text | None = None
    city: Text
    region: Text | None = None
    postal_code: Annotated[str, msgspec.Meta(min_length=1, max_length=20)]
    country: Country
    is_default: bool = False


class AddressPatch(Struct, kw_only=True):
    label: Text | Unset = UNSET
    line1: Text | Unset = UNSET
    line2: Text | Unset | None = UNSET
    city: Text | Unset = UNSET
    region: Text | Unset | None = UNSET
    postal_code: Annotated[str, msgspec.Meta(min_length=1, max_length=20)] | Unset = UNSET
    country: Country | Unset = UNSET
    is_default: bool | Unset = UNSET


class AddressList(msgspec.Struct, kw_only=True):
    items: list[Address]
    next_cursor: str | None = None


class OwnEventPage(msgspec.Struct, kw_only=True):
    items: list[OwnEvent]
    next_cursor: str | None


class OwnVenuePage(msgspec.Struct, kw_only=True):
    items: list[VenueSummary]
    next_cursor: str | None


Limit = Annotated[int, msgspec.Meta(ge=1, le=100)]
Cursor = Annotated[str, msgspec.Meta(max_length=200)]


class OwnEventQuery(msgspec.Struct, kw_only=True):
    status: Literal["draft", "published", "cancelled", "completed"] | None = None
    limit: Limit = 20
    cursor: Cursor | None = None


class PageQuery(msgspec.Struct, kw_only=True):
    limit: Limit = 20
    cursor: Cursor | None = None


PAGE_PARAMS = (
    ("limit", "integer", "page size, 1 to 100 (default 20)"),
    ("cursor", "string", "next_cursor of the previous page"),
)


def _given(patch: msgspec.Struct) -> dict[str, object]:
    return {f: getattr(patch, f) for f in patch.__struct_fields__ if getattr(patch, f) is not UNSET}


def _not_found() -> ApiError:
    return ApiError("not_found", "No such address.")


@openapi.endpoint(summary="My profile.", tag="users", response=Profile, auth=True)
async def get_profile(request: Request) -> Response:
    who = security.authenticate(request)
    async with state(request).db.acquire() as conn:
        found = await users.profile(conn, who.user_id)
    if found is None:
        raise ApiError("unauthorized", "The account no longer exists.")
    return JSONResponse(found)


@openapi.endpoint(
    summary="Change my name, phone or locale.",
    tag="users",
    body=ProfilePatch,
    response=Profile,
    auth=True,
)
async def patch_profile(request: Request) -> Response:
    who = security.authenticate(request)
    patch = await read_json(request, ProfilePatch)
    if isinstance(patch.name, str):
        users.check_name(patch.name)
    async with state(request).db.acquire() as conn:
        return JSONResponse(await users.update_profile(conn, who.user_id, _given(patch)))


@openapi.endpoint(summary="My addresses.", tag="users", response=AddressList, auth=True)
async def list_addresses(request: Request) -> Response:
    who = security.authenticate(request)
    async with state(request).db.acquire() as conn:
        return JSONResponse(AddressList(items=await users.addresses(conn, who.user_id)))


@openapi.endpoint(
    summary="Add an address; is_default makes it my only default.",
    tag="users",
    body=NewAddress,
    response=Address,
    status=201,
    auth=True,
    errors=("conflict",),
)
async def add_address(request: Request) -> Response:
    who = security.authenticate(request)
    body = await read_json(request, NewAddress)
    async with state(request).db.acquire() as conn:
        address = await users.add_address(conn, who.user_id, msgspec.structs.asdict(body))
    return JSONResponse(address, status_code=201)


@openapi.endpoint(
    summary="Change one of my addresses.",
    tag="users",
    body=AddressPatch,
    response=Address,
    auth=True,
    errors=("not_found", "conflict"),
)
async def patch_address(request: Request) -> Response:
    who = security.authenticate(request)
    address_id: uuid.UUID = request.path_params["address_id"]
    patch = await read_json(request, AddressPatch)
    async with state(request).db.acquire() as conn:
        address = await users.update_address(conn, who.user_id, str(address_id), _given(patch))
    if address is None:
        raise _not_found()
    return JSONResponse(address)


@openapi.endpoint(
    summary="Delete one of my addresses.",
    tag="users",
    status=204,
    auth=True,
    errors=("not_found",),
)
async def delete_address(request: Request) -> Response:
    who = security.authenticate(request)
    address_id: uuid.UUID = request.path_params["address_id"]
    async with state(request).db.acquire() as conn:
        if not await users.delete_address(conn, who.user_id, str(address_id)):
            raise _not_found()
    return Response(status_code=204)


@openapi.endpoint(
    summary="My events in every status, drafts included, newest first (organizers).",
    tag="users",
    response=OwnEventPage,
    auth=True,
    query=(("status", "string", "draft, published, cancelled or completed"), *PAGE_PARAMS),
    errors=("forbidden", "validation_error"),
)
async def list_own_events(request: Request) -> Response:
    who = security.require(request, "organizer")
    query = read_query(request, OwnEventQuery)
    async with state(request).db.acquire() as conn:
        items, next_cursor = await events.list_own(
            conn, who.user_id, query.status, query.limit, query.cursor
        )
    return JSONResponse(OwnEventPage(items=items, next_cursor=next_cursor))


@openapi.endpoint(
    summary="My venues, newest first, without their layouts (organizers).",
    tag="users",
    response=OwnVenuePage,
    auth=True,
    query=PAGE_PARAMS,
    errors=("forbidden", "validation_error"),
)
async def list_own_venues(request: Request) -> Response:
    who = security.require(request, "organizer")
    query = read_query(request, PageQuery)
    async with state(request).db.acquire() as conn:
        items, next_cursor = await venues.list_own(conn, who.user_id, query.limit, query.cursor)
    return JSONResponse(OwnVenuePage(items=items, next_cursor=next_cursor))


routes = [
    Route("/users/me/profile", get_profile, methods=["GET"]),
    Route("/users/me/profile", patch_profile, methods=["PATCH"]),
    Route("/users/me/addresses", list_addresses, methods=["GET"]),
    Route("/users/me/addresses", add_address, methods=["POST"]),
    Route("/users/me/addresses/{address_id:uuid}", patch_address, methods=["PATCH"]),
    Route("/users/me/addresses/{address_id:uuid}", delete_address, methods=["DELETE"]),
    Route("/users/me/events", list_own_events, methods=["GET"]),
    Route("/users/me/venues", list_own_venues, methods=["GET"]),
]
