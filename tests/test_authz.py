"""The authorization matrix: every route of the route table, for every kind of caller.

Callers: anonymous, a buyer (who owns the booking, ticket, hold and address below), another
buyer, the organizer (who owns the venue and the events), another organizer, and an admin. The
table below says, for each route and caller, what must happen; a route missing from it fails
the test, so a new route cannot go without its row.

    o  served: anything but 401, 403 and 404 (a 409 or 422 of a well-formed request is fine)
    d  served, and it may have consumed its resource: anything but 401 and 403
    *  public and not about ownership: anything but a 5xx
    u  401    f  403    n  404 (another's resource does not exist for you)
"""

from __future__ import annotations

import uuid

from bilten import docs_ui, routes
from bilten.routes import web
from tests.catalog_helpers import admin_signed_in, event_body, png, register, venue_body
from tests.test_bookings import book

ACTORS = ("anon", "buyer", "other", "org", "rival", "admin")
WS = "covered by tests/test_realtime.py"


def rows(r: dict[str, str]) -> list[tuple[str, str, str, dict | None, str]]:
    """(method, route template, path, json body or None, expectations in ACTORS order)."""
    e, d, c, v, b, t, h, a = (
        r[k] for k in ("event", "draft", "doomed", "venue", "booking", "ticket", "hold", "address")
    )
    seat = {"event_id": e, "seat_ids": [r["seat"]]}
    pay = {"payment": {"method": "card", "token": "tok_visa"}}
    return [
        ("POST", "/bookings", "/bookings", {**seat, **pay}, "uooooo"),
        ("POST", "/tickets/purchase", "/tickets/purchase", {**seat, **pay}, "uooooo"),
        ("POST", "/events", "/events", event_body(v), "uffofo"),
        ("GET", "/events", "/events", None, "oooooo"),
        ("GET", "/events/{event_id:uuid}", f"/events/{e}", None, "oooooo"),
        ("GET", "/events/{event_id:uuid}", f"/events/{d}", None, "nnnono"),
        ("PATCH", "/events/{event_id:uuid}", f"/events/{d}", {"title": "Renamed"}, "unnono"),
        ("POST", "/events/{event_id:uuid}/publish", f"/events/{d}/publish", None, "unndnd"),
        ("POST", "/events/{event_id:uuid}/cancel", f"/events/{c}/cancel", None, "uffdfd"),
        ("GET", "/events/{event_id:uuid}/seats", f"/events/{e}/seats", None, "oooooo"),
        ("POST", "/events/{event_id:uuid}/image", f"/events/{e}/image", "image", "uffofo"),
        ("GET", "/media/{name}", "/media/no-such-image.png", None, "nnnnnn"),
        ("POST", "/holds", "/holds", {"event_id": e, "seat_ids": [r["spare"]]}, "uooooo"),
        ("DELETE", "/holds/{hold_id:uuid}", f"/holds/{h}", None, "udnnnd"),
        ("GET", "/bookings", "/bookings", None, "uooooo"),
        ("GET", "/bookings/requests/{request_id:uuid}", f"/bookings/requests/{b}", None, "uonnno"),
        ("GET", "/bookings/{booking_id:uuid}", f"/bookings/{b}", None, "uonnno"),
        ("POST", "/payments/webhooks/{provider}", "/payments/webhooks/stripe", {}, "nnnnnn"),
        ("GET", "/tickets", "/tickets", None, "uooooo"),
        ("POST", "/tickets/check-in", "/tickets/check-in", {"code": r["code"]}, "uffofo"),
        ("GET", "/tickets/{ticket_id:uuid}", f"/tickets/{t}", None, "uonono"),
        ("GET", "/tickets/{ticket_id:uuid}/qr.svg", f"/tickets/{t}/qr.svg", None, "uonono"),
        ("GET", "/events/{event_id:uuid}/ticket-key", f"/events/{e}/ticket-key", None, "oooooo"),
        ("GET", "/events/{event_id:uuid}/stats", f"/events/{e}/stats", None, "uffofo"),
        ("POST", "/venues", "/venues", venue_body(), "uffooo"),
        ("GET", "/venues/{venue_id:uuid}", f"/venues/{v}", None, "oooooo"),
        ("POST", "/auth/register", "/auth/register", "register", "******"),
        (
            "POST",
            "/auth/login",
            "/auth/login",
            {"email": "x@example.com", "password": "x"},
            "******",
        ),
        ("POST", "/auth/refresh", "/auth/refresh", {"refresh_token": "nope"}, "******"),
        ("POST", "/auth/logout", "/auth/logout", {"refresh_token": "nope"}, "******"),
        ("GET", "/auth/me", "/auth/me", None, "uooooo"),
        ("POST", "/auth/verify-email", "/auth/verify-email", {"token": "nope"}, "******"),
        (
            "POST",
            "/auth/forgot-password",
            "/auth/forgot-password",
            {"email": "x@example.com"},
            "******",
        ),
        (
            "POST",
            "/auth/reset-password",
            "/auth/reset-password",
            {"token": "n", "password": "p" * 12},
            "******",
        ),
        ("GET", "/users/me/profile", "/users/me/profile", None, "uooooo"),
        ("PATCH", "/users/me/profile", "/users/me/profile", {"name": "New Name"}, "uooooo"),
        ("GET", "/users/me/addresses", "/users/me/addresses", None, "uooooo"),
        ("GET", "/users/me/events", "/users/me/events", None, "uffooo"),
        ("GET", "/users/me/venues", "/users/me/venues", None, "uffooo"),
        ("POST", "/users/me/addresses", "/users/me/addresses", ADDRESS, "uooooo"),
        (
            "PATCH",
            "/users/me/addresses/{address_id:uuid}",
            f"/users/me/addresses/{a}",
            {"city": "Bergen"},
            "uonnnn",
        ),
        (
            "DELETE",
            "/users/me/addresses/{address_id:uuid}",
            f"/users/me/addresses/{a}",
            None,
            "udnnnn",
        ),
        ("GET", "/realtime/stats", "/realtime/stats", None, "uffffo"),
        ("GET", "/health", "/health", None, "oooooo"),
        ("GET", "/health/ready", "/health/ready", None, "oooooo"),
        ("GET", "/metrics", "/metrics", None, "oooooo"),
        ("GET", "/openapi.json", "/openapi.json", None, "oooooo"),
        ("GET", "/docs", "/docs", None, "oooooo"),
        ("GET", "/docs/assets/{digest}/{path}", f"{docs_ui.PREFIX}/docs.js", None, "oooooo"),
        ("GET", "/", "/", None, "oooooo"),
        ("GET", "/assets/{digest}/{path:path}", f"{web.PREFIX}/js/main.js", None, "oooooo"),
        # Last: it voids the ticket the rows above use.
        ("POST", "/bookings/{booking_id:uuid}/cancel", f"/bookings/{b}/cancel", None, "udnnnd"),
    ]


ADDRESS = {
    "label": "Home",
    "line1": "1 Street",
    "city": "Oslo",
    "postal_code": "0150",
    "country": "NO",
}


def table() -> set[tuple[str, str]]:
    """Every (method, route template) the app serves, HEAD aside."""
    found = set()
    for route in routes.build(frozenset({"api", "realtime", "workers"})):
        for method in getattr(route, "methods", None) or {"WS"}:
            if method != "HEAD":
                found.add((method, route.path))
    return found


def judge(expected: str, status: int) -> bool:
    return {
        "o": status not in (401, 403, 404) and status < 500,
        "d": status not in (401, 403) and status < 500,
        "*": status < 500,
        "u": status == 401,
        "f": status == 403,
        "n": status == 404,
    }[expected]


async def test_every_route_for_every_caller(client, settings, database_url):
    async def user(role="attendee"):
        headers, _ = await register(client, f"{role}-{uuid.uuid4().hex[:8]}@example.com", role)
        return headers

    callers = {
        "anon": {},
        "buyer": await user(),
        "other": await user(),
        "org": await user("organizer"),
        "rival": await user("organizer"),
        "admin": await admin_signed_in(
            client, database_url, settings, f"a-{uuid.uuid4().hex[:6]}@x.com"
        ),
    }
    org = callers["org"]
    venue = (await client.post("/venues", headers=org, json=venue_body())).json()["id"]

    async def event(publish: bool) -> str:
        made = (await client.post("/events", headers=org, json=event_body(venue))).json()["id"]
        if publish:
            assert (await client.post(f"/events/{made}/publish", headers=org)).status_code == 200
        return made

    published, draft, doomed = await event(True), await event(False), await event(True)
    seats = [s["id"] for s in (await client.get(f"/events/{published}/seats")).json()["seats"]]
    buyer = callers["buyer"]
    booked = (await book(client, buyer, {"event_id": published, "seat_ids": seats[:1]})).json()
    hold = (
        await client.post(
            "/holds", headers=buyer, json={"event_id": published, "seat_ids": seats[1:2]}
        )
    ).json()
    address = (await client.post("/users/me/addresses", headers=buyer, json=ADDRESS)).json()
    resources = {
        "event": published,
        "draft": draft,
        "doomed": doomed,
        "venue": venue,
        "booking": booked["booking"]["id"],
        "ticket": booked["booking"]["tickets"][0]["id"],
        "code": booked["booking"]["tickets"][0]["code"],
        "hold": hold["id"],
        "address": address["id"],
        "seat": seats[2],
        "spare": seats[3],
    }
    matrix = rows(resources)
    covered = {(m, template) for m, template, *_ in matrix} | {("WS", "/ws")}
    assert table() - covered == set(), "routes without a row in the matrix"

    wrong = []
    for method, _, path, body, expected in matrix:
        assert len(expected) == len(ACTORS), path
        # Denials first: an allowed call may consume what the others are tested on.
        order = sorted(range(len(ACTORS)), key=lambda n: expected[n] in "od*")
        for n in order:
            headers = {**callers[ACTORS[n]], "Idempotency-Key": uuid.uuid4().hex}
            kwargs: dict = {"headers": headers}
            if body == "image":
                kwargs["files"] = {"file": ("poster.png", png(8, 8), "image/png")}
            elif body == "register":
                kwargs["json"] = {
                    "email": f"new-{uuid.uuid4().hex[:8]}@example.com",
                    "password": "a long enough password",
                    "name": "New",
                }
            elif body is not None:
                kwargs["json"] = body
            response = await client.request(method, path, **kwargs)
            if not judge(expected[n], response.status_code):
                wrong.append(
                    f"{method} {path} as {ACTORS[n]}: {response.status_code}, "
                    f"expected {expected[n]}: {response.text[:120]}"
                )
    assert wrong == [], "\n".join(wrong)
