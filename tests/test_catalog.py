"""The catalog over HTTP: venues, events and their status machine, search, seat maps, caches."""

import asyncio
import base64
import contextlib
import json
import time
import uuid
from datetime import datetime, timedelta

import httpx
import pytest
from asgi_lifespan import LifespanManager

from bilten import db, keys, metrics, venues
from bilten.app import create_app
from bilten.settings import Rate
from tests.catalog_helpers import (
    START,
    admin_signed_in,
    event_body,
    field_of,
    iso,
    new_event,
    new_venue,
    png,
    register,
    signed_in,
    venue_body,
)
from tests.conftest import truncate

HOLD = """UPDATE event_seats SET status = 'held', hold_id = gen_random_uuid(),
              hold_expires_at = now() + $3::interval, version = nextval('catalog_version')
          WHERE event_id = $1 AND seat_id = $2"""


@pytest.fixture
def settings(settings, tmp_path):
    # Several users register from the one test address within a test.
    return settings.replace(media_dir=tmp_path / "media", limit_register_ip=Rate(1000, 60))


@pytest.fixture(autouse=True)
async def no_users(database_url):
    await truncate(database_url, "users")


@contextlib.asynccontextmanager
async def sql(database_url):
    conn = await db.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


class Instance:
    """An app whose lifespan state (and so its caches) the test can reach."""

    def __init__(self, settings):
        self.app = create_app(settings)
        self.lifespan_state = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            self.lifespan_state = scope["state"]  # the app's lifespan fills it in place
        await self.app(scope, receive, send)

    @property
    def state(self):
        return self.lifespan_state["bilten"]


@contextlib.asynccontextmanager
async def running(settings):
    instance = Instance(settings)
    # The app may take its own shutdown_timeout to stop its workers, and a moment more.
    patience = settings.shutdown_timeout + 10
    async with LifespanManager(instance, shutdown_timeout=patience) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bilten.test") as c:
            yield instance, c


def ids(response):
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def image_upload():
    return {"file": ("poster.png", png(8, 8), "image/png")}


# --- roles ----------------------------------------------------------------------------------


async def test_attendee_cannot_create_venues_or_events(client):
    attendee = await signed_in(client, "att@example.com")
    organizer = await signed_in(client, "org@example.com", "organizer")
    denied = await client.post("/venues", headers=attendee, json=venue_body())
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "forbidden"
    assert (await client.post("/venues", json=venue_body())).status_code == 401
    venue = await new_venue(client, organizer)
    denied = await client.post("/events", headers=attendee, json=event_body(venue["id"]))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "forbidden"
    assert (await client.get("/events")).json()["items"] == []


async def test_another_organizers_event_is_403_when_published_and_404_when_draft(client):
    ann = await signed_in(client, "ann@example.com", "organizer")
    bob = await signed_in(client, "bob@example.com", "organizer")
    attendee = await signed_in(client, "att@example.com")
    venue = await new_venue(client, ann)
    published = await new_event(client, ann, venue["id"], publish=True)
    draft = await new_event(client, ann, venue["id"], title="Draft Concert")

    for intruder in (bob, attendee):
        for event, status, code in ((published, 403, "forbidden"), (draft, 404, "not_found")):
            url = f"/events/{event['id']}"
            for response in (
                await client.patch(url, headers=intruder, json={"title": "Mine now"}),
                await client.post(f"{url}/publish", headers=intruder),
                await client.post(f"{url}/cancel", headers=intruder),
                await client.post(f"{url}/image", headers=intruder, files=image_upload()),
            ):
                assert response.status_code == status, (event["title"], response.text)
                assert response.json()["error"]["code"] == code
    # Nothing changed.
    after = (await client.get(f"/events/{published['id']}")).json()
    assert (after["title"], after["status"], after["image_url"]) == (
        "Spring Concert",
        "published",
        None,
    )
    after = (await client.get(f"/events/{draft['id']}", headers=ann)).json()
    assert (after["title"], after["status"]) == ("Draft Concert", "draft")
    # Anonymous callers are asked to sign in.
    assert (await client.post(f"/events/{published['id']}/cancel")).status_code == 401


async def test_drafts_are_seen_only_by_their_owner(client):
    ann = await signed_in(client, "ann@example.com", "organizer")
    bob = await signed_in(client, "bob@example.com", "organizer")
    attendee = await signed_in(client, "att@example.com")
    venue = await new_venue(client, ann)
    published = await new_event(client, ann, venue["id"], publish=True)
    draft = await new_event(client, ann, venue["id"], title="Draft", starts=START - timedelta(1))
    bobs_draft = await new_event(
        client,
        bob,
        (await new_venue(client, bob))["id"],
        title="Bob's",
        starts=START + timedelta(1),
    )
    missing = (await client.get(f"/events/{uuid.uuid4()}")).json()

    for who in ({}, bob, attendee):
        for path in (f"/events/{draft['id']}", f"/events/{draft['id']}/seats"):
            response = await client.get(path, headers=who)
            assert response.status_code == 404
            assert response.json() == missing  # indistinguishable from no event at all
        listed = ids(await client.get("/events", headers=who))
        assert draft["id"] not in listed
        assert published["id"] in listed
    assert ids(await client.get("/events")) == [published["id"]]

    mine = await client.get(f"/events/{draft['id']}", headers=ann)
    assert mine.status_code == 200 and mine.json()["status"] == "draft"
    seats = await client.get(f"/events/{draft['id']}/seats", headers=ann)
    assert seats.status_code == 200 and len(seats.json()["seats"]) == 13
    # The owner's listing holds their drafts too, in start order, and no one else's.
    assert ids(await client.get("/events", headers=ann)) == [draft["id"], published["id"]]
    assert ids(await client.get("/events", headers=bob)) == [published["id"], bobs_draft["id"]]


async def test_an_admin_manages_any_event(client, database_url, settings):
    ann = await signed_in(client, "ann@example.com", "organizer")
    admin = await admin_signed_in(client, database_url, settings)
    venue = await new_venue(client, ann)
    draft = await new_event(client, ann, venue["id"])
    published = await new_event(client, ann, venue["id"], publish=True)

    seen = await client.get(f"/events/{draft['id']}", headers=admin)
    assert seen.status_code == 200
    assert (await client.get(f"/events/{draft['id']}/seats", headers=admin)).status_code == 200
    patched = await client.patch(
        f"/events/{draft['id']}", headers=admin, json={"title": "Renamed by admin"}
    )
    assert patched.status_code == 200 and patched.json()["title"] == "Renamed by admin"
    assert (await client.post(f"/events/{draft['id']}/publish", headers=admin)).status_code == 200
    assert (await client.get(f"/events/{draft['id']}")).json()["status"] == "published"
    image = await client.post(
        f"/events/{published['id']}/image", headers=admin, files=image_upload()
    )
    assert image.status_code == 201, image.text
    cancelled = await client.post(f"/events/{published['id']}/cancel", headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # An admin may also create an event at anyone's venue, and a venue of their own.
    assert (
        await client.post("/events", headers=admin, json=event_body(venue["id"]))
    ).status_code == 201
    assert (await client.post("/venues", headers=admin, json=venue_body())).status_code == 201


# --- venues ---------------------------------------------------------------------------------


async def test_create_and_read_a_venue(client):
    auth, user_id = await register(client, "org@example.com", "organizer")
    created = await client.post("/venues", headers=auth, json=venue_body())
    assert created.status_code == 201, created.text
    venue = created.json()
    uuid.UUID(venue["id"])
    assert venue["seat_count"] == 13
    assert venue["owner_id"] == user_id
    assert (venue["name"], venue["city"], venue["country"], venue["timezone"]) == (
        "Konserthus",
        "Oslo",
        "NO",
        "Europe/Oslo",
    )
    layout = [
        {"name": s["name"], "rows": s["rows"]} for s in venue["sections"]
    ]  # ids and coordinates are the server's
    assert layout == venue_body()["sections"]
    stalls, balcony = venue["sections"]
    assert balcony["y"] > stalls["y"]  # stacked, not on top of each other
    fetched = await client.get(f"/venues/{venue['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == venue
    missing = await client.get(f"/venues/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_seat_coordinates_are_computed_and_distinct(client):
    auth = await signed_in(client, "org@example.com", "organizer")
    venue = await new_venue(
        client,
        auth,
        sections=[
            *venue_body()["sections"],
            {"name": "Box", "x": 40, "y": -10, "rows": [{"label": "1", "seats": 2}]},
        ],
    )
    assert venue["sections"][2]["x"] == 40 and venue["sections"][2]["y"] == -10
    event = await new_event(
        client,
        auth,
        venue["id"],
        price_tiers=[
            {"name": "All", "price_cents": 1000, "sections": ["Stalls", "Balcony", "Box"]}
        ],
    )
    seats = (await client.get(f"/events/{event['id']}/seats", headers=auth)).json()["seats"]
    assert len(seats) == 15
    points = {(s["x"], s["y"]) for s in seats}
    assert len(points) == 15
    by_label = {s["label"]: s for s in seats}
    assert set(by_label) == {
        *(f"Stalls A{n}" for n in range(1, 5)),
        *(f"Stalls B{n}" for n in range(1, 7)),
        *(f"Balcony A{n}" for n in range(1, 4)),
        "Box 11",
        "Box 12",
    }
    row_a = [by_label[f"Stalls A{n}"] for n in range(1, 5)]
    row_b = [by_label[f"Stalls B{n}"] for n in range(1, 7)]
    assert len({s["y"] for s in row_a}) == 1 and len({s["y"] for s in row_b}) == 1
    assert row_b[0]["y"] > row_a[0]["y"]
    assert [s["x"] for s in row_a] == sorted(s["x"] for s in row_a)
    # The shorter row is centred on the longer one.
    assert row_a[0]["x"] + row_a[-1]["x"] == pytest.approx(row_b[0]["x"] + row_b[-1]["x"])
    assert min(s["y"] for s in seats if s["section"] == "Balcony") > row_b[0]["y"]
    assert {(s["x"], s["y"]) for s in seats if s["section"] == "Box"} == {(40, -10), (41, -10)}


async def test_invalid_venues_are_422s_naming_the_field(client, database_url):
    auth = await signed_in(client, "org@example.com", "organizer")
    stalls = venue_body()["sections"][0]

    async def post(**overrides):
        return await client.post("/venues", headers=auth, json=venue_body(**overrides))

    assert field_of(await post(sections=[stalls, stalls])) == "sections"
    assert field_of(await post(country="Norway")) == "country"
    assert field_of(await post(country="no")) == "country"
    assert field_of(await post(timezone="Mars/Olympus_Mons")) == "timezone"
    assert field_of(await post(timezone="../../etc/passwd")) == "timezone"
    twice = {"name": "S", "rows": [{"label": "A", "seats": 2}, {"label": "A", "seats": 3}]}
    assert field_of(await post(sections=[twice])).startswith("sections")
    no_seats = {"name": "S", "rows": [{"label": "A", "seats": 0}]}
    assert field_of(await post(sections=[no_seats])) == "sections[0].rows[0].seats"
    assert field_of(await post(sections=[])) == "sections"
    far = {"name": "S", "x": 1e39, "rows": [{"label": "A", "seats": 1}]}
    assert field_of(await post(sections=[far])) == "sections[0].x"
    async with sql(database_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM venues") == 0


async def test_a_venue_too_large_is_refused_before_its_seats_are_laid_out(client, monkeypatch):
    auth = await signed_in(client, "org@example.com", "organizer")
    laid_out = []
    real_layout = venues.layout
    monkeypatch.setattr(venues, "layout", lambda s: laid_out.append(s) or real_layout(s))
    rows = [{"label": f"R{i}", "seats": 1000} for i in range(500)]
    # Twenty million seats in a body of a few hundred kilobytes.
    sections = [{"name": f"S{j}", "rows": rows} for j in range(40)]
    response = await client.post("/venues", headers=auth, json=venue_body(sections=sections))
    assert field_of(response) == "sections"
    assert "100000" in response.json()["error"]["message"]
    assert laid_out == []
    assert (await client.post("/venues", headers=auth, json=venue_body())).status_code == 201
    assert len(laid_out) == 1


# --- creating events ------------------------------------------------------------------------


async def test_create_an_event(client):
    auth, user_id = await register(client, "org@example.com", "organizer")
    venue = await new_venue(client, auth)
    created = await client.post("/events", headers=auth, json=event_body(venue["id"]))
    assert created.status_code == 201, created.text
    event = created.json()
    assert event["status"] == "draft"
    assert event["organizer_id"] == user_id and event["venue_id"] == venue["id"]
    assert event["city"] == "Oslo"  # the venue's
    assert event["starts_at"] == iso(START)
    assert event["seat_count"] == 13 and event["available_seats"] == 13
    assert (event["min_price_cents"], event["max_price_cents"]) == (2000, 6000)
    assert event["max_tickets_per_order"] == 10
    assert [(t["name"], t["price_cents"], t["sections"]) for t in event["price_tiers"]] == [
        ("Front", 6000, ["Stalls"]),
        ("Back", 3000, ["Balcony"]),
    ]
    [standing] = event["ticket_types"]
    assert (standing["name"], standing["price_cents"]) == ("Standing", 2000)
    assert standing["capacity"] == standing["remaining"] == 50
    assert (await client.get(f"/events/{event['id']}", headers=auth)).json() == event


async def test_invalid_events_are_refused(client, database_url):
    ann = await signed_in(client, "ann@example.com", "organizer")
    bob = await signed_in(client, "bob@example.com", "organizer")
    venue = await new_venue(client, ann)

    async def post(auth=ann, **overrides):
        return await client.post("/events", headers=auth, json=event_body(venue["id"], **overrides))

    unknown = await post(price_tiers=[{"name": "T", "price_cents": 1, "sections": ["Gallery"]}])
    assert field_of(unknown) == "price_tiers"
    assert "Gallery" in unknown.json()["error"]["message"]
    twice = await post(
        price_tiers=[
            {"name": "T1", "price_cents": 1, "sections": ["Stalls"]},
            {"name": "T2", "price_cents": 2, "sections": ["Balcony", "Stalls"]},
        ]
    )
    assert field_of(twice) == "price_tiers"
    assert "Stalls" in twice.json()["error"]["message"]
    assert field_of(await post(ends_at=iso(START - timedelta(minutes=1)))) == "ends_at"
    assert field_of(await post(ends_at=iso(START))) == "ends_at"
    assert field_of(await post(sale_starts_at=iso(START + timedelta(days=1)))) == "sale_starts_at"
    assert field_of(await post(starts_at="2031-05-01T19:00:00")) == "starts_at"  # no zone
    assert field_of(await post(venue_id=str(uuid.uuid4()))) == "venue_id"
    assert field_of(await post(venue_id="hall-1")) == "venue_id"
    assert field_of(await post(currency="euro")) == "currency"
    assert field_of(await post(price_tiers=[], ticket_types=[])) == "price_tiers"
    same_name = [{"name": "T", "price_cents": 1, "sections": [s]} for s in ("Stalls", "Balcony")]
    assert field_of(await post(price_tiers=same_name)) == "price_tiers"
    elsewhere = await post(auth=bob)
    assert elsewhere.status_code == 403
    assert elsewhere.json()["error"]["code"] == "forbidden"
    async with sql(database_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM events") == 0


async def test_an_event_of_ten_thousand_seats(client):
    auth = await signed_in(client, "org@example.com", "organizer")
    rows = [{"label": f"R{i}", "seats": 100} for i in range(1, 101)]
    venue = await new_venue(client, auth, sections=[{"name": "Arena", "rows": rows}])
    assert venue["seat_count"] == 10_000
    body = event_body(
        venue["id"], price_tiers=[{"name": "Arena", "price_cents": 5000, "sections": ["Arena"]}]
    )
    began = time.perf_counter()
    created = await client.post("/events", headers=auth, json=body)
    elapsed = time.perf_counter() - began
    print(f"\nPOST /events materialising 10,000 seats: {elapsed * 1000:.0f} ms")
    assert created.status_code == 201, created.text
    assert elapsed < 10
    event = created.json()
    assert event["seat_count"] == event["available_seats"] == 10_000
    seat_map = (await client.get(f"/events/{event['id']}/seats", headers=auth)).json()
    assert len(seat_map["seats"]) == 10_000
    assert len({s["id"] for s in seat_map["seats"]}) == 10_000
    assert len({(s["x"], s["y"]) for s in seat_map["seats"]}) == 10_000


# --- the status machine ---------------------------------------------------------------------


async def test_draft_published_cancelled(client):
    auth = await signed_in(client, "org@example.com", "organizer")
    venue = await new_venue(client, auth)
    event = await new_event(client, auth, venue["id"])
    url = f"/events/{event['id']}"

    published = await client.post(f"{url}/publish", headers=auth)
    assert published.status_code == 200 and published.json()["status"] == "published"
    again = await client.post(f"{url}/publish", headers=auth)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    assert again.json()["error"]["details"] == {"status": "published", "to": "published"}
    patched = await client.patch(url, headers=auth, json={"title": "Still on"})
    assert patched.status_code == 200 and patched.json()["title"] == "Still on"

    cancelled = await client.post(f"{url}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    for response in (
        await client.post(f"{url}/cancel", headers=auth),
        await client.post(f"{url}/publish", headers=auth),
        await client.patch(url, headers=auth, json={"title": "Back on"}),
        await client.patch(url, headers=auth, json={}),  # nothing to change: the same answer
    ):
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "conflict"
    final = (await client.get(url)).json()
    assert (final["status"], final["title"]) == ("cancelled", "Still on")

    # A draft may be cancelled without ever being published; then it cannot be published.
    other = await new_event(client, auth, venue["id"])
    assert (await client.post(f"/events/{other['id']}/cancel", headers=auth)).status_code == 200
    assert (await client.post(f"/events/{other['id']}/publish", headers=auth)).status_code == 409


async def test_patching_an_event(client):
    auth = await signed_in(client, "org@example.com", "organizer")
    venue = await new_venue(client, auth)
    event = await new_event(client, auth, venue["id"], sale_starts_at=iso(START - timedelta(30)))
    url = f"/events/{event['id']}"
    later = START + timedelta(days=7)
    moved = await client.patch(
        url, headers=auth, json={"starts_at": iso(later), "ends_at": iso(later + timedelta(1))}
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["starts_at"] == iso(later)
    assert moved.json()["title"] == "Spring Concert"  # untouched
    cleared = await client.patch(url, headers=auth, json={"sale_starts_at": None})
    assert cleared.json()["sale_starts_at"] is None
    backwards = await client.patch(url, headers=auth, json={"ends_at": iso(later)})
    assert field_of(backwards) == "ends_at"
    unknown = await client.patch(url, headers=auth, json={"status": "published"})
    assert unknown.status_code == 422 and "status" in unknown.json()["error"]["message"]
    assert field_of(await client.patch(url, headers=auth, json={"title": ""})) == "title"
    assert (await client.get(url, headers=auth)).json()["starts_at"] == iso(later)


# --- search ---------------------------------------------------------------------------------


async def test_search_filters(client):
    auth = await signed_in(client, "org@example.com", "organizer")
    oslo = (await new_venue(client, auth))["id"]
    bergen = (await new_venue(client, auth, name="Grieghallen", city="Bergen"))["id"]
    stalls_only = [{"name": "Stalls", "price_cents": 10_000, "sections": ["Stalls"]}]
    concert = await new_event(client, auth, oslo, publish=True)  # 2000..6000, 1 May
    hamlet = await new_event(
        client,
        auth,
        bergen,
        publish=True,
        title="Hamlet",
        category="Theatre",
        description="The Prince of Denmark.",
        starts=datetime(2031, 6, 1, 19, tzinfo=START.tzinfo),
        price_tiers=stalls_only,
        ticket_types=[],
    )
    jazz = await new_event(
        client,
        auth,
        bergen,
        publish=True,
        title="Jazz Night",
        description="Quartet.",
        starts=datetime(2031, 7, 1, 19, tzinfo=START.tzinfo),
        price_tiers=[],
        ticket_types=[{"name": "Entry", "price_cents": 1500, "capacity": 100}],
    )
    await new_event(client, auth, oslo, title="Secret Concert")  # a draft
    cancelled = await new_event(client, auth, oslo, publish=True, title="Cancelled Concert")
    assert (await client.post(f"/events/{cancelled['id']}/cancel", headers=auth)).status_code == 200

    async def found(**params):
        return ids(await client.get("/events", params=params))

    assert await found() == [concert["id"], hamlet["id"], jazz["id"]]
    assert await found(q="concert") == [concert["id"]]
    assert await found(q="concerts") == [concert["id"]]  # stemmed
    assert await found(q="CONCERT") == [concert["id"]]
    assert await found(q="denmark") == [hamlet["id"]]  # the description counts too
    assert await found(q="opera") == []
    assert await found(city="bergen") == [hamlet["id"], jazz["id"]]
    assert await found(city="OSLO") == [concert["id"]]
    assert await found(category="music") == [concert["id"], jazz["id"]]
    assert await found(category="THEATRE") == [hamlet["id"]]
    assert await found(**{"from": "2031-05-15T00:00:00Z"}) == [hamlet["id"], jazz["id"]]
    assert await found(to="2031-06-15T00:00:00Z") == [concert["id"], hamlet["id"]]
    assert await found(**{"from": iso(START), "to": "2031-06-01T19:00:00Z"}) == [concert["id"]]
    assert await found(min_price=7000) == [hamlet["id"]]
    assert await found(max_price=1800) == [jazz["id"]]
    assert await found(min_price=2500, max_price=5000) == [concert["id"]]
    assert await found(q="night", city="oslo") == []
    assert await found(q="night", city="bergen", category="music") == [jazz["id"]]
    page = (await client.get("/events", params={"city": "oslo"})).json()
    assert page["next_cursor"] is None
    [item] = page["items"]
    assert item["title"] == "Spring Concert" and item["status"] == "published"
    assert (item["min_price_cents"], item["max_price_cents"]) == (2000, 6000)


async def test_search_refuses_bad_parameters(client):
    async def status_and_field(**params):
        response = await client.get("/events", params=params)
        return field_of(response)

    assert await status_and_field(limit=101) == "limit"
    assert await status_and_field(limit=0) == "limit"
    assert await status_and_field(limit="ten") == "limit"
    assert await status_and_field(min_price=-1) == "min_price"
    assert await status_and_field(**{"from": "yesterday"}) == "from"
    # Without an offset the time would be read in the server's own zone.
    assert await status_and_field(**{"from": "2031-05-15T00:00:00"}) == "from"
    assert await status_and_field(to="2031-05-15T00:00:00") == "to"
    assert await status_and_field(cursor="garbage!") == "cursor"
    assert await status_and_field(cursor="x" * 201) == "cursor"
    assert await status_and_field(cursor="bm90IGpzb24") == "cursor"  # "not json"
    # Well-formed, but not something this API issued.
    forged = base64.urlsafe_b64encode(json.dumps([iso(START), "nope"]).encode()).decode()
    assert await status_and_field(cursor=forged.rstrip("=")) == "cursor"
    forged = base64.urlsafe_b64encode(json.dumps({"a": 1}).encode()).decode()
    assert await status_and_field(cursor=forged) == "cursor"
    assert (await client.get("/events", params={"limit": 100})).status_code == 200


async def test_paging_sees_every_event_once_while_events_are_added(client):
    auth = await signed_in(client, "org@example.com", "organizer")
    venue = (await new_venue(client, auth))["id"]
    admission = [{"name": "GA", "price_cents": 100, "capacity": 10}]

    async def add(starts):
        event = await new_event(
            client, auth, venue, publish=True, starts=starts, price_tiers=[], ticket_types=admission
        )
        return (event["starts_at"], event["id"])

    # Pairs share a start time, so the order between them is decided by the id.
    initial = {await add(START + timedelta(days=i // 2)) for i in range(14)}
    seen: list[tuple[str, str]] = []
    added_ahead: set[tuple[str, str]] = set()
    cursor = None
    pages = 0
    while True:
        params = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/events", params=params)).json()
        pages += 1
        seen += [(item["starts_at"], item["id"]) for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        if pages <= 3:
            position = seen[-1]
            # Behind the reader, level with it (the id decides), and ahead of it.
            for starts in (
                START - timedelta(days=1),
                datetime.fromisoformat(position[0]),
                START + timedelta(days=100 + pages),
            ):
                event = await add(starts)
                if event > position:
                    added_ahead.add(event)
        assert pages < 20
    assert len(seen) == len(set(seen)), "an event was listed twice"
    assert seen == sorted(seen), "not in start order"
    assert initial <= set(seen), "an event was skipped"
    assert set(seen) == initial | added_ahead
    assert len(added_ahead) >= 3


# --- seat maps ------------------------------------------------------------------------------


async def test_seat_map(client, database_url, redis):
    auth = await signed_in(client, "org@example.com", "organizer")
    venue = await new_venue(client, auth)
    event = await new_event(client, auth, venue["id"], publish=True)
    url = f"/events/{event['id']}/seats"

    first = await client.get(url)
    assert first.status_code == 200
    seat_map = first.json()
    assert seat_map["event_id"] == event["id"]
    version = seat_map["version"]
    assert isinstance(version, int) and version > 0
    # The ETag names the version and the count of committed changes (see seatmap.py).
    assert first.headers["etag"].startswith(f'"{version}.')
    seats = seat_map["seats"]
    assert len(seats) == 13 and len({s["id"] for s in seats}) == 13
    tiers = {"Stalls": ("Front", 6000), "Balcony": ("Back", 3000)}
    for seat in seats:
        assert (seat["tier"], seat["price_cents"]) == tiers[seat["section"]]
        assert seat["status"] == "available"
        assert seat["label"] == f"{seat['section']} {seat['row']}{seat['number']}"
    assert [(s["section"], s["row"], s["number"]) for s in seats[:5]] == [
        ("Stalls", "A", 1),
        ("Stalls", "A", 2),
        ("Stalls", "A", 3),
        ("Stalls", "A", 4),
        ("Stalls", "B", 1),
    ]

    unchanged = await client.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert unchanged.headers["etag"] == first.headers["etag"]
    listed = await client.get(url, headers={"If-None-Match": f'"1", {first.headers["etag"]}'})
    assert listed.status_code == 304
    assert (await client.get(url, headers={"If-None-Match": '"1"'})).status_code == 200
    # Weak comparison: a proxy that compressed the map may have weakened the tag.
    weak = await client.get(url, headers={"If-None-Match": f"W/{first.headers['etag']}"})
    assert weak.status_code == 304
    assert (await client.get(url, headers={"If-None-Match": "*"})).status_code == 304

    again = await client.get(url)
    assert again.content == first.content
    tag = first.headers["etag"].strip('"')
    assert await redis.get(f"bilten:seatmap:{event['id']}:{tag}") == first.content

    held_seat, expired_seat, sold_seat = seats[0]["id"], seats[1]["id"], seats[12]["id"]
    async with sql(database_url) as conn:
        await conn.execute(HOLD, event["id"], held_seat, timedelta(minutes=10))
    after_hold = await client.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert after_hold.status_code == 200
    moved = after_hold.json()["version"]
    assert moved > version
    assert after_hold.headers["etag"].startswith(f'"{moved}.')
    status = {s["id"]: s["status"] for s in after_hold.json()["seats"]}
    assert status[held_seat] == "held"
    assert sum(s == "available" for s in status.values()) == 12

    async with sql(database_url) as conn:
        await conn.execute(HOLD, event["id"], expired_seat, timedelta(minutes=-1))
        await conn.execute(
            """UPDATE event_seats SET status = 'sold', booking_id = gen_random_uuid(),
                      version = nextval('catalog_version')
               WHERE event_id = $1 AND seat_id = $2""",
            event["id"],
            sold_seat,
        )
    latest = (await client.get(url)).json()
    assert latest["version"] > moved
    status = {s["id"]: s["status"] for s in latest["seats"]}
    assert status[held_seat] == "held"
    assert status[expired_seat] == "available"  # its hold ran out; no sweeper needed
    assert status[sold_seat] == "sold"
    detail = (await client.get(f"/events/{event['id']}")).json()
    assert detail["available_seats"] == 11  # neither the held nor the sold seat


async def test_a_change_committed_out_of_version_order_still_moves_the_seat_map(
    client, database_url
):
    auth = await signed_in(client, "org@example.com", "organizer")
    venue = await new_venue(client, auth)
    event = await new_event(client, auth, venue["id"], publish=True)
    url = f"/events/{event['id']}/seats"
    first, second = [s["id"] for s in (await client.get(url)).json()["seats"][:2]]
    async with sql(database_url) as slow, sql(database_url) as fast:
        async with slow.transaction():
            await slow.execute(HOLD, event["id"], first, timedelta(minutes=10))  # version v
            async with fast.transaction():
                await fast.execute(HOLD, event["id"], second, timedelta(minutes=10))  # v + 1
            seen = await client.get(url)
            assert {s["id"]: s["status"] for s in seen.json()["seats"]}[second] == "held"
        # The first hold is committed now, with a version below the one already served.
    after = await client.get(url, headers={"If-None-Match": seen.headers["etag"]})
    assert after.status_code == 200
    assert {s["id"]: s["status"] for s in after.json()["seats"]}[first] == "held"


async def test_seat_map_without_seats(client):
    auth = await signed_in(client, "org@example.com", "organizer")
    venue = await new_venue(client, auth)
    event = await new_event(client, auth, venue["id"], publish=True, price_tiers=[])
    response = await client.get(f"/events/{event['id']}/seats")
    assert response.status_code == 200
    assert response.json()["seats"] == []
    assert response.headers["etag"].startswith(f'"{response.json()["version"]}.')
    missing = await client.get(f"/events/{uuid.uuid4()}/seats")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_seat_maps_are_served_from_the_caches(settings, redis):
    async with running(settings) as (instance, client):
        auth = await signed_in(client, "org@example.com", "organizer")
        venue = await new_venue(client, auth)
        event = await new_event(client, auth, venue["id"], publish=True)
        url = f"/events/{event['id']}/seats"
        first = await client.get(url)
        key = f"bilten:seatmap:{event['id']}:{first.headers['etag'].strip(chr(34))}"
        local = instance.state.caches.seat_maps
        assert local.get(event["id"]).body == first.content
        assert await redis.get(key) == first.content
        assert (await client.get(url)).content == first.content

        local.drop(event["id"])
        assert (await client.get(url)).content == first.content
        assert local.get(event["id"]).body == first.content

        # Whatever Redis holds for this version is what is served: it is not rebuilt.
        marked = first.content.replace(b'"Stalls A1"', b'"Stalls A1*"', 1)
        assert marked != first.content
        await redis.set(key, marked)
        local.drop(event["id"])
        assert (await client.get(url)).content == marked


async def test_seat_map_reads_of_one_loop_turn_share_one_statement(settings, database_url):
    async with running(settings) as (instance, client):
        auth = await signed_in(client, "org@example.com", "organizer")
        venue = await new_venue(client, auth)
        event = await new_event(client, auth, venue["id"], publish=True)
        url = f"/events/{event['id']}/seats"
        first = await client.get(url)
        heads = instance.state.caches.seat_heads
        batches: list[list[str]] = []
        handle = heads.handle

        async def counted(calls):
            batches.append(calls)
            return await handle(calls)

        heads.handle = counted
        answers = await asyncio.gather(*(client.get(url) for _ in range(20)))
        assert all(a.content == first.content for a in answers)
        assert len(batches) < 20 and sum(len(b) for b in batches) == 20
        # A change committed before a request came is seen by it, whatever the batch.
        seat = first.json()["seats"][0]["id"]
        async with sql(database_url) as conn:
            await conn.execute(HOLD, event["id"], seat, timedelta(minutes=10))
        answers = await asyncio.gather(*(client.get(url) for _ in range(5)))
        for answer in answers:
            assert answer.headers["etag"] != first.headers["etag"]
            assert answer.json()["seats"][0]["status"] == "held"


async def test_a_crowd_asking_for_a_new_version_of_the_seat_map_costs_one_build(
    settings, database_url
):
    async with running(settings) as (_, client):
        auth = await signed_in(client, "org@example.com", "organizer")
        venue = await new_venue(client, auth)
        event = await new_event(client, auth, venue["id"], publish=True)
        url = f"/events/{event['id']}/seats"
        first = await client.get(url)
        for n in range(3):  # each change a new version; each crowd asks for it at once
            seat = first.json()["seats"][n]["id"]
            async with sql(database_url) as conn:
                await conn.execute(HOLD, event["id"], seat, timedelta(minutes=10))
            builds = metrics.SEAT_MAP_BUILDS._value.get()
            answers = await asyncio.gather(*(client.get(url) for _ in range(30)))
            assert metrics.SEAT_MAP_BUILDS._value.get() - builds == 1
            assert len({a.headers["etag"] for a in answers}) == 1
            assert all(a.json()["seats"][n]["status"] == "held" for a in answers)


# --- event detail and its caches ------------------------------------------------------------


async def test_event_detail_counts_what_is_left(client, database_url):
    auth = await signed_in(client, "org@example.com", "organizer")
    venue = await new_venue(client, auth)
    event = await new_event(client, auth, venue["id"], publish=True)
    url = f"/events/{event['id']}"
    detail = (await client.get(url)).json()
    assert detail["seat_count"] == detail["available_seats"] == 13
    assert [(t["name"], t["remaining"]) for t in detail["ticket_types"]] == [("Standing", 50)]

    seats = (await client.get(f"{url}/seats")).json()["seats"]
    async with sql(database_url) as conn:
        await conn.execute(HOLD, event["id"], seats[0]["id"], timedelta(minutes=10))
        await conn.execute(HOLD, event["id"], seats[1]["id"], timedelta(minutes=-1))
        await conn.execute(
            "UPDATE ticket_types SET held = 5, sold = 7, version = nextval('catalog_version')"
            " WHERE event_id = $1",
            event["id"],
        )
    # A change made through the API is visible at once, and so is everything else.
    renamed = await client.patch(url, headers=auth, json={"title": "Summer Concert"})
    assert renamed.status_code == 200
    detail = (await client.get(url)).json()
    assert detail["title"] == "Summer Concert"
    assert detail["available_seats"] == 12
    assert [(t["name"], t["remaining"]) for t in detail["ticket_types"]] == [("Standing", 38)]
    assert ids(await client.get("/events", params={"q": "summer"})) == [event["id"]]


async def test_a_change_on_one_instance_reaches_the_cache_of_another(settings, database_url, redis):
    async with (
        running(settings.replace(instance_id="aaaa0001")) as (_, a),
        running(settings.replace(instance_id="bbbb0002")) as (instance_b, b),
    ):
        while (await redis.pubsub_numsub(keys.CATALOG_CHANGED))[0][1] < 2:
            await asyncio.sleep(0.01)  # both listeners subscribed
        auth = await signed_in(a, "org@example.com", "organizer")
        venue = await new_venue(a, auth)
        event = await new_event(a, auth, venue["id"], publish=True)
        url = f"/events/{event['id']}"
        await asyncio.sleep(0.2)  # the announcement of the publication reaches B first
        assert (await b.get(url)).json()["title"] == "Spring Concert"
        assert instance_b.state.caches.details.get(event["id"]) is not None
        async with sql(database_url) as conn:
            await conn.execute("UPDATE events SET title = 'Unannounced' WHERE id = $1", event["id"])
        assert (await b.get(url)).json()["title"] == "Spring Concert"  # B serves its copy

        patched = await a.patch(url, headers=auth, json={"title": "Autumn Concert"})
        assert patched.status_code == 200
        deadline = time.monotonic() + 1.0
        while (title := (await b.get(url)).json()["title"]) != "Autumn Concert":
            assert time.monotonic() < deadline, f"B still shows {title!r}"
            await asyncio.sleep(0.01)


async def test_folding_seat_map_commits_keeps_the_tag(settings, database_url):
    from bilten.sagas import recovery

    async with running(settings.replace(roles=frozenset({"api"}))) as (instance, client):
        auth = await signed_in(client, "org@example.com", "organizer")
        venue = await new_venue(client, auth)
        event = await new_event(client, auth, venue["id"], publish=True)
        url = f"/events/{event['id']}/seats"
        seat = (await client.get(url)).json()["seats"][0]["id"]
        async with sql(database_url) as conn:
            for _ in range(recovery.FOLD_AFTER + 5):
                await conn.execute(HOLD, event["id"], seat, timedelta(minutes=10))
            rows = await conn.fetchval(
                "SELECT count(*) FROM seat_map_commits WHERE event_id = $1", event["id"]
            )
        before = (await client.get(url)).headers["etag"]
        assert rows > recovery.FOLD_AFTER
        assert await recovery.fold_seat_map_commits(instance.state) >= 1
        async with sql(database_url) as conn:
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM seat_map_commits WHERE event_id = $1", event["id"]
                )
                == 1
            )
        assert (await client.get(url, headers={"If-None-Match": before})).status_code == 304


async def test_organizers_have_daily_quotas(settings, database_url):
    """Venues, their seats and events a day per organizer (admins are not limited):
    self-service accounts cannot fill the database."""
    tight = settings.replace(
        quota_venues=Rate(2, 86400),
        quota_seats=Rate(30, 86400),
        quota_events=Rate(1, 86400),
    )
    async with running(tight) as (_, c):
        org = await signed_in(c, f"q-{uuid.uuid4().hex[:6]}@example.com", "organizer")
        small = {
            "sections": [
                {"name": "Stalls", "rows": [{"label": "A", "seats": 5}]},
                {"name": "Balcony", "rows": [{"label": "A", "seats": 5}]},
            ]
        }
        first = await c.post("/venues", headers=org, json=venue_body(**small))
        assert first.status_code == 201
        assert (await c.post("/venues", headers=org, json=venue_body(**small))).status_code == 201
        third = await c.post("/venues", headers=org, json=venue_body(**small))
        assert third.status_code == 429 and third.headers["retry-after"]
        other = await signed_in(c, f"q-{uuid.uuid4().hex[:6]}@example.com", "organizer")
        seats = {"sections": [{"name": "A", "rows": [{"label": "A", "seats": 20}]}]}
        assert (await c.post("/venues", headers=other, json=venue_body(**seats))).status_code == 201
        over = await c.post("/venues", headers=other, json=venue_body(**seats))
        assert over.status_code == 429  # 40 seats would pass the 30 a day
        venue = first.json()["id"]
        # A refused creation spends nothing: an invalid event leaves the day's one to come.
        nowhere = [{"name": "Nowhere", "price_cents": 100, "sections": ["No such section"]}]
        broken = await c.post("/events", headers=org, json=event_body(venue, price_tiers=nowhere))
        assert broken.status_code == 422 and "section" in broken.text
        made = await c.post("/events", headers=org, json=event_body(venue))
        assert made.status_code == 201, made.text
        assert (await c.post("/events", headers=org, json=event_body(venue))).status_code == 429
        admin = await admin_signed_in(c, database_url, tight, f"adm-{uuid.uuid4().hex[:6]}@x.com")
        for _ in range(3):
            made = await c.post("/venues", headers=admin, json=venue_body(**small))
            assert made.status_code == 201
