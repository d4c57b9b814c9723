"""Profiles, addresses and roles over HTTP."""

import asyncio
import uuid

import pytest
from asgi_lifespan import LifespanManager
from httpx import ASGITransport, AsyncClient
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bilten import openapi, security
from bilten.app import create_app
from tests.conftest import truncate

ADDRESS = {
    "label": "Home",
    "line1": "1 Main St",
    "city": "Oslo",
    "postal_code": "0150",
    "country": "NO",
}


@pytest.fixture(autouse=True)
async def no_users(database_url):
    await truncate(database_url, "users")


async def signed_in(client, email, role="attendee"):
    response = await client.post(
        "/auth/register",
        json={"email": email, "password": "a long enough password", "name": email, "role": role},
    )
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def test_profile_read_and_patch(client):
    auth = await signed_in(client, "p@example.com")
    profile = (await client.get("/users/me/profile", headers=auth)).json()
    assert profile["email"] == "p@example.com"
    assert profile["phone"] is None
    changed = await client.patch(
        "/users/me/profile",
        headers=auth,
        json={"name": "Pat", "phone": "+4712345678", "locale": "nb-NO"},
    )
    assert changed.status_code == 200
    assert changed.json()["name"] == "Pat"
    assert changed.json()["phone"] == "+4712345678"
    cleared = await client.patch("/users/me/profile", headers=auth, json={"phone": None})
    assert cleared.json()["phone"] is None
    assert cleared.json()["name"] == "Pat"  # untouched fields keep their values
    bad = await client.patch("/users/me/profile", headers=auth, json={"phone": "12"})
    assert bad.status_code == 422
    assert bad.json()["error"]["details"]["fields"][0]["field"] == "phone"
    for name in (" ", "Pat\r\nBcc: x"):
        odd = await client.patch("/users/me/profile", headers=auth, json={"name": name})
        assert odd.status_code == 422, name
        assert odd.json()["error"]["details"]["fields"][0]["field"] == "name"
    unknown = await client.patch("/users/me/profile", headers=auth, json={"role": "admin"})
    assert unknown.status_code == 422
    assert unknown.json()["error"]["details"]["fields"][0]["field"] == "role"
    assert (await client.get("/users/me/profile")).status_code == 401


async def test_address_crud(client):
    auth = await signed_in(client, "a@example.com")
    created = await client.post("/users/me/addresses", headers=auth, json=ADDRESS)
    assert created.status_code == 201, created.text
    address = created.json()
    assert address["is_default"] is False and address["line2"] is None
    listed = (await client.get("/users/me/addresses", headers=auth)).json()
    assert listed == {"items": [address], "next_cursor": None}
    patched = await client.patch(
        f"/users/me/addresses/{address['id']}", headers=auth, json={"city": "Bergen"}
    )
    assert patched.status_code == 200 and patched.json()["city"] == "Bergen"
    deleted = await client.delete(f"/users/me/addresses/{address['id']}", headers=auth)
    assert deleted.status_code == 204
    assert (await client.get("/users/me/addresses", headers=auth)).json()["items"] == []
    again = await client.delete(f"/users/me/addresses/{address['id']}", headers=auth)
    assert again.status_code == 404


async def test_invalid_address_is_a_422_naming_the_field(client):
    auth = await signed_in(client, "v@example.com")
    response = await client.post(
        "/users/me/addresses", headers=auth, json={**ADDRESS, "country": "Norway"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"]["fields"][0]["field"] == "country"


async def test_one_default_address_per_user(client):
    auth = await signed_in(client, "d@example.com")
    first = (
        await client.post("/users/me/addresses", headers=auth, json={**ADDRESS, "is_default": True})
    ).json()
    second = (
        await client.post(
            "/users/me/addresses",
            headers=auth,
            json={**ADDRESS, "label": "Work", "is_default": True},
        )
    ).json()
    items = (await client.get("/users/me/addresses", headers=auth)).json()["items"]
    assert [a["id"] for a in items if a["is_default"]] == [second["id"]]
    await client.patch(
        f"/users/me/addresses/{first['id']}", headers=auth, json={"is_default": True}
    )
    items = (await client.get("/users/me/addresses", headers=auth)).json()["items"]
    assert [a["id"] for a in items if a["is_default"]] == [first["id"]]


async def test_concurrent_defaults_leave_exactly_one(client):
    auth = await signed_in(client, "c@example.com")
    responses = await asyncio.gather(
        *(
            client.post(
                "/users/me/addresses",
                headers=auth,
                json={**ADDRESS, "label": f"L{i}", "is_default": True},
            )
            for i in range(8)
        )
    )
    assert {r.status_code for r in responses} <= {201, 409}
    items = (await client.get("/users/me/addresses", headers=auth)).json()["items"]
    assert sum(a["is_default"] for a in items) == 1


async def test_another_users_address_is_a_404_for_every_verb(client):
    ann = await signed_in(client, "ann@example.com")
    bob = await signed_in(client, "bob@example.com")
    address = (await client.post("/users/me/addresses", headers=ann, json=ADDRESS)).json()
    url = f"/users/me/addresses/{address['id']}"
    assert (await client.get("/users/me/addresses", headers=bob)).json()["items"] == []
    patched = await client.patch(url, headers=bob, json={"city": "Stolen"})
    assert patched.status_code == 404
    assert patched.json()["error"]["code"] == "not_found"
    assert (await client.delete(url, headers=bob)).status_code == 404
    never = await client.patch(
        f"/users/me/addresses/{uuid.uuid4()}", headers=bob, json={"city": "X"}
    )
    assert never.json() == patched.json()  # indistinguishable from a missing address
    mine = (await client.get("/users/me/addresses", headers=ann)).json()["items"]
    assert mine == [address]
    assert (await client.get(url, headers=bob)).status_code == 405  # no single-address GET


async def test_require_role(settings, client):
    @openapi.endpoint(summary="Organizers only.", tag="test")
    async def organizers_only(request: Request):
        who = security.require(request, "organizer")
        return PlainTextResponse(who.role)

    app = create_app(settings)
    app.router.routes.append(Route("/_test/organizers", organizers_only))
    attendee = await signed_in(client, "att@example.com")
    organizer = await signed_in(client, "org@example.com", role="organizer")
    async with LifespanManager(app) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
        ) as c:
            denied = await c.get("/_test/organizers", headers=attendee)
            assert denied.status_code == 403
            assert denied.json()["error"]["code"] == "forbidden"
            assert (await c.get("/_test/organizers", headers=organizer)).text == "organizer"
            assert (await c.get("/_test/organizers")).status_code == 401


async def test_addresses_are_bounded_even_when_added_at_once(client, monkeypatch):
    from bilten import users

    monkeypatch.setattr(users, "MAX_ADDRESSES", 5)
    auth = await signed_in(client, "many@example.com")
    answers = await asyncio.gather(
        *(client.post("/users/me/addresses", headers=auth, json=ADDRESS) for _ in range(12))
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] * 5 + [409] * 7
    refused = next(a for a in answers if a.status_code == 409)
    assert refused.json()["error"]["details"] == {"max_addresses": 5}
    assert len((await client.get("/users/me/addresses", headers=auth)).json()["items"]) == 5
