"""The buyer's pages in a real browser: live seat map, hold, payment, tickets, bookings.

Two browser contexts watch one event: what one buyer does shows in the other's seat map
without a reload. A 10,000-seat map is drawn and kept live within the page's budgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from tests.browser import Site, shoot, sign_in, watch_console
from tests.catalog_helpers import event_body, venue_body

pytestmark = pytest.mark.slow

# Keeps the page's sockets where a test can close them, and records when each message arrives
# (before the page's own listeners run).
SOCKET_CLOCK = """
window.__lastMessage = 0;
window.__sockets = [];
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) {
    super(...args);
    window.__sockets.push(this);
    this.addEventListener("message", () => { window.__lastMessage = performance.now(); });
  }
};
"""


def published_event(site: Site, **venue: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An organizer and a published event at a new venue (``venue`` overrides its body)."""
    organizer = site.register("organizer")
    place = site.api("POST", "/venues", organizer, json=venue_body(**venue))
    sections = [s["name"] for s in venue.get("sections", [])] or ["Stalls", "Balcony"]
    body = event_body(
        place["id"],
        price_tiers=[{"name": "Main", "price_cents": 4000, "sections": sections}],
        ticket_types=[{"name": "Standing", "price_cents": 2000, "capacity": 20}],
        max_tickets_per_order=6,
    )
    event = site.api("POST", "/events", organizer, json=body)
    site.api("POST", f"/events/{event['id']}/publish", organizer)
    return organizer, event


def seat(page: Any, seat_id: str) -> Any:
    return page.locator(f'circle.seat[data-id="{seat_id}"]')


def test_a_hold_and_a_sale_show_live_in_another_window(chromium, site):
    _, event = published_event(site)
    seats = site.api("GET", f"/events/{event['id']}/seats")["seats"]
    target = seats[3]
    buyer = site.register(name="Ann")
    watcher = site.register(name="Bob")

    one = chromium.new_context(viewport={"width": 1280, "height": 860})
    other = chromium.new_context(viewport={"width": 1280, "height": 860})
    try:
        page = one.new_page()
        seen = other.new_page()
        problems = watch_console(page) + watch_console(seen)
        frames: list[str] = []  # what the watching window's socket sends and gets
        seen.on(
            "websocket",
            lambda ws: (
                ws.on("framesent", lambda f: frames.append(f"> {f}")),
                ws.on("framereceived", lambda f: frames.append(f"< {f}")),
            ),
        )
        page.goto(f"{site.url}/")
        page.locator(".event-card").first.wait_for()
        shoot(page, "events")
        sign_in(page, site, buyer)
        sign_in(seen, site, watcher)
        for p in (page, seen):
            p.goto(f"{site.url}/#/events/{event['id']}")
            p.locator("circle.seat").first.wait_for()
            p.locator("#live-status[data-state=live]").wait_for()
        assert seat(seen, target["id"]).get_attribute("data-status") == "available"

        seat(page, target["id"]).click()
        assert "selected" in (seat(page, target["id"]).get_attribute("class") or "")
        page.get_by_role("button", name="Hold seats").click()
        page.locator(".countdown").wait_for()
        # The other window sees the seat held, without a reload.
        seat(seen, target["id"]).and_(seen.locator("[data-status=held]")).wait_for(timeout=3000)
        countdown = page.locator(".countdown").inner_text()
        assert countdown.startswith(("9:", "10:", "4:", "5:")), countdown
        shoot(page, "event-held")

        page.get_by_role("button", name="Pay").click()
        page.get_by_text("You have tickets").wait_for(timeout=15000)
        confirmed = time.monotonic()
        seat(seen, target["id"]).and_(seen.locator("[data-status=sold]")).wait_for(timeout=3000)
        assert time.monotonic() - confirmed < 1.0
        # The map asks for seats by index, and the changes come so.
        subscribe = next(json.loads(f[2:]) for f in frames if '"subscribe"' in f)
        assert subscribe["indexed"] is True, subscribe
        kinds = [json.loads(f[2:])["type"] for f in frames if f.startswith("<")]
        assert "seats.indexed" in kinds and "seats" not in kinds, kinds
        # The QR code of the new ticket is shown at once.
        qr = page.locator("figure.ticket img")
        qr.first.wait_for()
        page.wait_for_function(
            "() => [...document.querySelectorAll('figure.ticket img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        shoot(page, "event-confirmed")
        shoot(seen, "event-watching")

        # My tickets: the ticket with its QR code; my bookings: the confirmed booking.
        page.goto(f"{site.url}/#/tickets")
        page.locator("figure.ticket img[src^='blob:']").wait_for()
        assert target["label"] in page.locator("figure.ticket").first.inner_text()
        shoot(page, "my-tickets")
        page.goto(f"{site.url}/#/bookings")
        page.locator("article.booking .badge.confirmed").wait_for()
        shoot(page, "my-bookings")
        assert problems == []
    finally:
        one.close()
        other.close()


def test_a_declined_card_shows_the_api_error_and_frees_the_seat(chromium, site):
    _, event = published_event(site)
    target = site.api("GET", f"/events/{event['id']}/seats")["seats"][0]
    buyer = site.register()
    context = chromium.new_context()
    try:
        page = context.new_page()
        problems = watch_console(page)
        sign_in(page, site, buyer)
        page.goto(f"{site.url}/#/events/{event['id']}")
        seat(page, target["id"]).click()
        page.get_by_role("button", name="Hold seats").click()
        page.get_by_label("Test card").select_option("tok_chargeDeclined")
        page.get_by_role("button", name="Pay").click()
        error = page.locator(".error[data-code=payment_declined]")
        error.wait_for(timeout=15000)
        assert "declined" in error.inner_text().lower()
        seat(page, target["id"]).and_(page.locator("[data-status=available]")).wait_for()
        page.get_by_role("button", name="Hold seats").wait_for()
        assert problems == []
    finally:
        context.close()


def test_sign_up_shows_the_api_errors_and_then_signs_in(chromium, site):
    taken = site.register()
    context = chromium.new_context()
    try:
        page = context.new_page()
        problems = watch_console(page)
        page.goto(f"{site.url}/#/signup")
        page.get_by_label("Name").fill("Cleo")
        page.get_by_label("Email").fill(taken["email"])
        page.get_by_label("Password").fill("short")
        page.get_by_role("button", name="Create account").click()
        error = page.locator(".error[data-code=validation_error]")
        error.wait_for()
        assert "password" in error.inner_text()
        shoot(page, "sign-up-error")
        page.get_by_label("Password").fill("a long enough password")
        page.get_by_role("button", name="Create account").click()
        page.locator(".error[data-code=email_taken]").wait_for()
        page.get_by_label("Email").fill(f"new-{taken['email']}")
        page.get_by_role("button", name="Create account").click()
        page.get_by_role("button", name="Sign out").wait_for()
        assert "Cleo" in page.locator("#nav").inner_text()
        # A reload keeps the tab's session (the refresh token is in sessionStorage).
        page.reload()
        page.get_by_role("button", name="Sign out").wait_for()
        # The browser logs each 4xx answer; nothing else may appear.
        assert [p for p in problems if "Failed to load resource" not in p] == []
    finally:
        context.close()


def test_seats_are_chosen_from_the_keyboard(chromium, site):
    _, event = published_event(site)
    context = chromium.new_context()
    try:
        page = context.new_page()
        sign_in(page, site, site.register())
        page.goto(f"{site.url}/#/events/{event['id']}")
        page.locator("circle.seat").first.wait_for()
        page.locator("svg.seatmap").focus()
        readout = page.locator("#seat-readout")
        first = readout.inner_text()
        assert "available" in first
        page.keyboard.press("ArrowRight")
        second = readout.inner_text()
        assert second != first
        page.keyboard.press("Enter")
        assert "your choice" in readout.inner_text()
        assert page.locator("circle.seat.selected").count() == 1
        assert second.split(",")[0] in page.locator(".basket").inner_text()
        page.keyboard.press("Space")
        assert page.locator("circle.seat.selected").count() == 0
    finally:
        context.close()


def test_general_admission_is_held_and_bought_by_quantity(chromium, site):
    _, event = published_event(site)
    context = chromium.new_context()
    try:
        page = context.new_page()
        sign_in(page, site, site.register())
        page.goto(f"{site.url}/#/events/{event['id']}")
        page.get_by_label("Quantity").fill("3")
        assert "60.00" in page.locator(".basket").inner_text()
        page.get_by_role("button", name="Hold seats").click()
        page.get_by_role("button", name="Pay").click()
        page.get_by_text("You have tickets").wait_for(timeout=15000)
        assert page.locator("figure.ticket").count() == 3
        detail = site.api("GET", f"/events/{event['id']}")
        assert detail["ticket_types"][0]["remaining"] == 17
    finally:
        context.close()


def test_a_ten_thousand_seat_map_paints_fast_and_stays_live(chromium, site):
    sections = [
        {"name": f"Block {n}", "rows": [{"label": f"R{r}", "seats": 50} for r in range(50)]}
        for n in range(4)
    ]
    _, event = published_event(site, sections=sections)
    seats = site.api("GET", f"/events/{event['id']}/seats")["seats"]
    assert len(seats) == 10_000
    buyer = site.register()
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    try:
        page = context.new_page()
        page.add_init_script(SOCKET_CLOCK)
        problems = watch_console(page)
        page.goto(f"{site.url}/#/")
        page.locator("html[data-ready]").wait_for()
        began = page.evaluate("performance.now()")
        page.evaluate(f"location.hash = '/events/{event['id']}'")
        page.wait_for_function("() => document.querySelectorAll('circle.seat').length === 10000")
        page.evaluate(
            "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
        )
        painted = page.evaluate("performance.now()") - began
        assert painted < 2000, f"first paint of 10,000 seats took {painted:.0f} ms"
        page.locator("#live-status[data-state=live]").wait_for()

        # A seat held elsewhere: the time from the socket message to the changed circle.
        target = seats[5_000]["id"]
        page.evaluate(
            """(id) => {
                window.__applied = null;
                const node = document.querySelector(`circle.seat[data-id="${id}"]`);
                new MutationObserver(() => { window.__applied = performance.now(); })
                    .observe(node, { attributes: true, attributeFilter: ["data-status"] });
            }""",
            target,
        )
        sent = time.monotonic()
        site.api("POST", "/holds", buyer, json={"event_id": event["id"], "seat_ids": [target]})
        page.wait_for_function("() => window.__applied !== null", timeout=3000)
        end_to_end = time.monotonic() - sent
        applied = page.evaluate("window.__applied - window.__lastMessage")
        print(f"10,000 seats: first paint {painted:.0f} ms, delta applied in {applied:.1f} ms")
        assert 0 <= applied < 100, f"a delta took {applied:.1f} ms to apply"
        assert end_to_end < 1.5

        # Still interactive: zoom and a click on a seat answer at once.
        page.get_by_role("button", name="Zoom in").click()
        free = seats[9_999]["id"]
        page.get_by_role("button", name="Show the whole map").click()
        seat(page, free).click()
        assert "selected" in (seat(page, free).get_attribute("class") or "")
        shoot(page, "event-10k")
        assert problems == []
    finally:
        context.close()


def test_changes_missed_while_disconnected_arrive_after_the_reconnect(chromium, site):
    _, event = published_event(site)
    seats = site.api("GET", f"/events/{event['id']}/seats")["seats"]
    buyer = site.register()
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.add_init_script(SOCKET_CLOCK)
        problems = watch_console(page)
        page.goto(f"{site.url}/#/events/{event['id']}")
        page.locator("#live-status[data-state=live]").wait_for()
        # The socket drops; a seat is held meanwhile; the page reconnects and catches up.
        page.evaluate("() => window.__sockets.at(-1).close()")
        page.locator("#live-status[data-state=reconnecting]").wait_for()
        site.api(
            "POST", "/holds", buyer, json={"event_id": event["id"], "seat_ids": [seats[1]["id"]]}
        )
        page.locator("#live-status[data-state=live]").wait_for(timeout=10000)
        seat(page, seats[1]["id"]).and_(page.locator("[data-status=held]")).wait_for(timeout=3000)
        # And live changes keep coming on the new socket.
        site.api(
            "POST", "/holds", buyer, json={"event_id": event["id"], "seat_ids": [seats[2]["id"]]}
        )
        seat(page, seats[2]["id"]).and_(page.locator("[data-status=held]")).wait_for(timeout=3000)
        assert page.evaluate("() => window.__sockets.length") == 2
        assert problems == []
    finally:
        context.close()


def test_the_queue_position_shows_while_the_booking_waits(chromium, site, spawn_server):
    slow = Site(spawn_server(BILTEN_TEST_PAYMENT_LATENCY_MS="2500", BILTEN_LIMIT_API_IP="0/60").url)
    _, event = published_event(slow)
    seats = slow.api("GET", f"/events/{event['id']}/seats")["seats"]
    buyer = slow.register()
    context = chromium.new_context()
    try:
        page = context.new_page()
        problems = watch_console(page)
        sign_in(page, slow, buyer)
        page.goto(f"{slow.url}/#/events/{event['id']}")
        seat(page, seats[0]["id"]).click()
        page.get_by_role("button", name="Hold seats").click()
        page.get_by_role("button", name="Pay").click()
        position = page.locator(".position")
        position.wait_for()
        assert position.inner_text().strip().isdigit()
        shoot(page, "event-queued")
        page.get_by_text("You have tickets").wait_for(timeout=15000)
        assert problems == []
    finally:
        context.close()


def test_a_late_change_of_a_seat_never_overwrites_a_newer_one(chromium, site):
    """Changes commit, and so arrive, out of version order: the map keeps each seat's newest."""
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.goto(f"{site.url}/")
        page.locator("html[data-ready]").wait_for()
        statuses = page.evaluate(
            """async () => {
                const main = document.querySelector("script[type=module]").src;
                const { SeatMap } = await import(new URL("seatmap.js", main).href);
                const seat = (id) => ({ id, section: "A", row: "1", number: 1, label: id,
                                        x: 0, y: 0, tier: "T", price_cents: 100,
                                        status: "available", version: 5 });
                const map = new SeatMap({ seats: [seat("a"), seat("b")], currency: "EUR" });
                const seen = [];
                map.apply([{ seat_id: "a", status: "held", version: 7 }]);
                seen.push(map.status("a"));
                map.apply([{ seat_id: "a", status: "available", version: 6 },
                           { seat_id: "b", status: "sold", version: 6 }]);
                seen.push(map.status("a"), map.status("b"));
                map.apply([{ seat_id: "a", status: "sold", version: 8 }]);
                seen.push(map.status("a"));
                return seen;
            }"""
        )
        assert statuses == ["held", "held", "sold", "sold"]
    finally:
        context.close()


@contextlib.contextmanager
def rows_locked(database_url: str, seat_ids: list[str]) -> Iterator[None]:
    """The seats' rows locked by another transaction: a worker reaching them waits."""
    locked, done = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM event_seats WHERE seat_id = ANY($1::uuid[]) FOR UPDATE",
                    seat_ids,
                )
                locked.set()
                while not done.is_set():
                    await asyncio.sleep(0.02)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(hold(),))
    thread.start()
    try:
        assert locked.wait(10)
        yield
    finally:
        done.set()
        thread.join(10)


def test_seats_of_queued_bookings_show_held_until_they_sell_or_come_back(chromium, site, settings):
    """Seats asked for by queued bookings show held in every window at once (``seats.claimed``),
    while the worker is still on its way to them; they turn sold when sold, available again
    when the booking fails (``seats.released``)."""
    _, event = published_event(site)
    seats = site.api("GET", f"/events/{event['id']}/seats")["seats"]
    paid, declined = seats[0]["id"], seats[1]["id"]
    buyer = site.register()
    context = chromium.new_context()
    try:
        page = context.new_page()
        problems = watch_console(page)
        sign_in(page, site, site.register(name="Bob"))
        page.goto(f"{site.url}/#/events/{event['id']}")
        page.locator("#live-status[data-state=live]").wait_for()
        with rows_locked(settings.database_url, [paid, declined]):
            for seat_id, token in ((paid, "tok_visa"), (declined, "tok_chargeDeclined")):
                body = {"event_id": event["id"], "seat_ids": [seat_id]}
                body["payment"] = {"method": "card", "token": token}
                key = {"Idempotency-Key": token}
                assert site.api("POST", "/bookings", buyer, json=body, headers=key)["status"] in (
                    "queued",
                    "processing",
                )
            for seat_id in (paid, declined):
                seat(page, seat_id).and_(page.locator("[data-status=held]")).wait_for(timeout=3000)
            statuses = {
                s["id"]: s["status"]
                for s in site.api("GET", f"/events/{event['id']}/seats")["seats"]
            }
            assert statuses[paid] == statuses[declined] == "available"  # not sold yet
            seat(page, paid).click()
            page.get_by_text("is held").wait_for()
            shoot(page, "event-claimed")
        seat(page, paid).and_(page.locator("[data-status=sold]")).wait_for(timeout=15000)
        seat(page, declined).and_(page.locator("[data-status=available]")).wait_for(timeout=15000)
        assert problems == []
    finally:
        context.close()
