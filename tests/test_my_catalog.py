"""An organizer's own events and venues: GET /users/me/events and GET /users/me/venues."""

import pytest

from bilten.settings import Rate
from tests.catalog_helpers import (
    admin_signed_in,
    field_of,
    new_event,
    new_venue,
    register,
    signed_in,
)
from tests.conftest import truncate


@pytest.fixture
def settings(settings):
    # Several users register from the one test address within a test.
    return settings.replace(limit_register_ip=Rate(1000, 60))


@pytest.fixture(autouse=True)
async def no_users(database_url):
    await truncate(database_url, "users")


async def every_page(client, path, headers, limit):
    """The ids of all pages of a list, and how many pages it took."""
    seen, pages, cursor = [], 0, None
    while True:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, headers=headers, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) <= limit
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages


async def test_my_events_in_every_status_newest_first(client):
    ann = await signed_in(client, "ann@example.com", "organizer")
    bob = await signed_in(client, "bob@example.com", "organizer")
    venue = await new_venue(client, ann)
    draft = await new_event(client, ann, venue["id"], title="Draft")
    published = await new_event(client, ann, venue["id"], title="Published", publish=True)
    doomed = await new_event(client, ann, venue["id"], title="Cancelled", publish=True)
    cancel = await client.post(f"/events/{doomed['id']}/cancel", headers=ann)
    assert cancel.status_code == 200, cancel.text
    bobs = await new_event(client, bob, (await new_venue(client, bob))["id"], title="Bob's")

    response = await client.get("/users/me/events", headers=ann)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(e["title"], e["status"]) for e in body["items"]] == [
        ("Cancelled", "cancelled"),
        ("Published", "published"),
        ("Draft", "draft"),
    ]
    assert body["next_cursor"] is None
    first = body["items"][0]
    assert first["venue_id"] == venue["id"]
    assert first["currency"] == "EUR"
    assert first["created_at"] >= body["items"][1]["created_at"]

    only = await client.get("/users/me/events", headers=ann, params={"status": "draft"})
    assert [e["id"] for e in only.json()["items"]] == [draft["id"]]
    only = await client.get("/users/me/events", headers=ann, params={"status": "published"})
    assert [e["id"] for e in only.json()["items"]] == [published["id"]]

    theirs = (await client.get("/users/me/events", headers=bob)).json()["items"]
    assert [e["id"] for e in theirs] == [bobs["id"]]


async def test_my_events_page_by_page(client):
    ann = await signed_in(client, "ann@example.com", "organizer")
    venue = await new_venue(client, ann)
    made = [(await new_event(client, ann, venue["id"], title=f"Night {n}"))["id"] for n in range(5)]
    seen, pages = await every_page(client, "/users/me/events", ann, 2)
    assert seen == made[::-1]
    assert pages == 3
    seen, pages = await every_page(client, "/users/me/events", ann, 5)
    assert (seen, pages) == (made[::-1], 1)


async def test_my_venues_newest_first_page_by_page(client):
    ann = await signed_in(client, "ann@example.com", "organizer")
    bob = await signed_in(client, "bob@example.com", "organizer")
    made = [(await new_venue(client, ann, name=f"Hall {n}"))["id"] for n in range(3)]
    await new_venue(client, bob)

    response = await client.get("/users/me/venues", headers=ann)
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [v["id"] for v in items] == made[::-1]
    assert items[0]["name"] == "Hall 2"
    assert items[0]["seat_count"] == 13
    assert items[0]["timezone"] == "Europe/Oslo"
    assert "sections" not in items[0]  # the layout is GET /venues/{id}
    seen, pages = await every_page(client, "/users/me/venues", ann, 2)
    assert (seen, pages) == (made[::-1], 2)
    assert len((await client.get("/users/me/venues", headers=bob)).json()["items"]) == 1


async def test_attendees_are_refused_and_anonymous_callers_asked_to_sign_in(client):
    attendee = await signed_in(client, "att@example.com")
    for path in ("/users/me/events", "/users/me/venues"):
        denied = await client.get(path, headers=attendee)
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"]["code"] == "forbidden"
        assert (await client.get(path)).status_code == 401


async def test_an_admin_sees_own_events_and_venues_only(client, database_url, settings):
    ann = await signed_in(client, "ann@example.com", "organizer")
    await new_event(client, ann, (await new_venue(client, ann))["id"])
    admin = await admin_signed_in(client, database_url, settings)
    assert (await client.get("/users/me/events", headers=admin)).json()["items"] == []
    assert (await client.get("/users/me/venues", headers=admin)).json()["items"] == []
    venue = await new_venue(client, admin, name="Admin Hall")
    event = await new_event(client, admin, venue["id"], title="Admin Night")
    assert [
        e["id"] for e in (await client.get("/users/me/events", headers=admin)).json()["items"]
    ] == [event["id"]]
    assert [
        v["id"] for v in (await client.get("/users/me/venues", headers=admin)).json()["items"]
    ] == [venue["id"]]


async def test_bad_parameters_are_422s_naming_them(client):
    ann, _ = await register(client, "ann@example.com", "organizer")
    for path, params, field in (
        ("/users/me/events", {"status": "sold"}, "status"),
        ("/users/me/events", {"limit": "0"}, "limit"),
        ("/users/me/events", {"limit": "101"}, "limit"),
        ("/users/me/events", {"cursor": "not-a-cursor"}, "cursor"),
        ("/users/me/venues", {"limit": "many"}, "limit"),
        ("/users/me/venues", {"cursor": "bm9wZQ"}, "cursor"),
    ):
        response = await client.get(path, headers=ann, params=params)
        assert field_of(response) == field, (path, params)


async def test_the_routes_are_in_the_openapi_document(client):
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ("/users/me/events", "/users/me/venues"):
        operation = paths[path]["get"]
        assert operation["security"] == [{"bearer": []}]
        assert {"200", "401", "403", "422"} <= set(operation["responses"])
        assert {p["name"] for p in operation["parameters"]} >= {"limit", "cursor"}
