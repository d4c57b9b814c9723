"""The organizer's pages in a real browser: a venue and an event made through the forms, published,
given an image, and their sales followed live while a buyer books through the API."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.browser import DESKTOP, Site, shoot, sign_in, watch_console

pytestmark = pytest.mark.slow


def fill_venue(page: Any, timezone: str = "Europe/Oslo") -> None:
    """The venue form: 3 rows of 8 seats in the stalls (the filler), one row of 5 in the balcony."""
    page.get_by_label("Name", exact=True).fill("Konserthus")
    page.get_by_label("Address").fill("Munkedamsveien 14")
    page.get_by_label("City").fill("Oslo")
    page.get_by_label("Country").fill("no")
    page.get_by_label("Timezone").fill(timezone)
    first = page.locator("fieldset[data-section='0']")
    first.get_by_label("Section name").fill("Stalls")
    first.get_by_label("Rows", exact=True).fill("3")
    first.get_by_label("Seats per row").fill("8")
    first.get_by_role("button", name="Fill rows").click()
    page.get_by_role("button", name="Add section").click()
    second = page.locator("fieldset[data-section='1']")
    second.get_by_label("Section name").fill("Balcony")
    second.locator(".org-rowline").get_by_label("Seats").fill("5")


def shot(page: Any, name: str) -> None:
    """A screenshot without the toasts of the steps before."""
    page.evaluate("() => document.getElementById('toasts').replaceChildren()")
    shoot(page, name)


def seat_count(page: Any) -> int:
    return int(page.locator("svg.org-preview circle.seat").count())


def test_an_organizer_sets_up_a_sale_and_follows_it_live(chromium, site: Site, tmp_path: Path):
    organizer = site.register("organizer", name="Olga")
    context = chromium.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        problems = watch_console(page)
        sign_in(page, site, organizer)

        page.get_by_role("link", name="Organizer", exact=True).click()
        page.get_by_role("heading", name="Organizer").wait_for()
        page.get_by_text("No venues yet.").wait_for()
        page.get_by_role("link", name="New venue").click()

        # The venue, its preview following the form.
        page.get_by_role("heading", name="New venue").wait_for()
        assert seat_count(page) == 50  # the form starts with 5 rows of 10
        fill_venue(page)
        expect(page.locator("svg.org-preview circle.seat")).to_have_count(29)
        assert page.locator(".org-summary").inner_text() == "29 seats in 2 sections."
        labels = page.locator("svg.org-preview .section-label").all_text_contents()
        assert labels == ["Stalls", "Balcony"]
        # The layout is the server's: the balcony sits below the stalls' three rows and a gap.
        ys = {
            float(y)
            for y in page.locator("svg.org-preview circle.seat").evaluate_all(
                "cs => cs.map(c => c.getAttribute('cy'))"
            )
        }
        assert ys == {0.0, 1.0, 2.0, 5.0}
        shot(page, "organizer-venue")
        page.get_by_role("button", name="Create venue").click()

        # The event, at the venue just made.
        page.get_by_role("heading", name="New event").wait_for()
        assert "/organizer/events/new?venue=" in page.url
        assert "Konserthus" in page.get_by_label("Venue").locator("option:checked").inner_text()
        page.get_by_label("Title").fill("Spring Concert")
        page.get_by_label("Description").fill("Chamber music in the great hall.")
        page.get_by_label("Category").select_option("concert")
        page.get_by_label("Starts", exact=True).fill("2031-06-01T19:00")
        page.get_by_label("Ends", exact=True).fill("2031-06-01T21:00")
        tier = page.locator("fieldset[data-tier='0']")
        tier.get_by_label("Tier name").fill("Main")
        tier.get_by_label("Price (EUR)").fill("45.50")
        tier.get_by_label("Stalls").wait_for()
        assert tier.get_by_label("Stalls").is_checked()
        assert tier.get_by_label("Balcony").is_checked()
        shot(page, "organizer-event")
        page.get_by_role("button", name="Create event").click()

        # Managed: publish, then an image.
        page.get_by_role("heading", name="Spring Concert").wait_for()
        event_id = page.url.rsplit("/", 1)[1]
        assert page.locator(".badge[data-status=draft]").count() == 1
        event = site.api("GET", f"/events/{event_id}", organizer)
        assert event["starts_at"] == "2031-06-01T17:00:00Z"  # 19:00 in Oslo's summer time
        assert [
            (t["name"], t["price_cents"], sorted(t["sections"])) for t in event["price_tiers"]
        ] == [("Main", 4550, ["Balcony", "Stalls"])]
        page.get_by_role("button", name="Publish").click()
        page.locator(".badge[data-status=published]").wait_for()
        poster = tmp_path / "poster.png"
        Image.new("RGB", (64, 36), "teal").save(poster)
        page.get_by_label("Event image").set_input_files(str(poster))
        page.get_by_role("button", name="Upload image").click()
        image = page.locator(".org-image img")
        image.wait_for()
        assert re.fullmatch(r"/media/[0-9a-f]+\.png", image.get_attribute("src") or "")
        assert image.evaluate("img => img.decode().then(() => img.naturalWidth)") == 64

        # Listed at home.
        page.get_by_role("link", name="← Organizer").click()
        item = page.locator(f"li[data-id='{event_id}']")
        item.wait_for()
        assert item.get_by_role("link", name="Spring Concert").is_visible()
        assert item.locator(".badge").inner_text() == "published"
        expect(page.locator(".org-venue-item").get_by_text("29 seats")).to_be_visible()
        shot(page, "organizer-home")

        # The stats page follows a sale without a reload.
        item.get_by_role("link", name="Spring Concert").click()
        tickets_sold = page.locator("[data-stat=tickets_sold]")
        tickets_sold.wait_for()
        assert tickets_sold.inner_text() == "0"
        assert page.locator("svg.org-chart rect.bar").count() == 0
        page.locator("#live-status[data-state=live]").wait_for()
        buyer = site.register(name="Bea")
        seats = site.api("GET", f"/events/{event_id}/seats")["seats"]
        hold = site.api(
            "POST", "/holds", buyer, json={"event_id": event_id, "seat_ids": [seats[0]["id"]]}
        )
        booked = site.api(
            "POST",
            "/bookings",
            buyer,
            json={
                "event_id": event_id,
                "hold_id": hold["id"],
                "payment": {"method": "card", "token": "tok_visa"},
            },
            headers={"Prefer": "wait=10", "Idempotency-Key": uuid.uuid4().hex},
        )
        assert booked["status"] == "confirmed", booked
        expect(tickets_sold).to_have_text("1", timeout=15000)
        assert page.locator("[data-stat=revenue]").inner_text().replace("\xa0", " ") in (
            "€45.50",
            "45.50 €",
            "€ 45.50",
        )
        page.locator("svg.org-chart rect.bar").wait_for()
        chart = page.locator("svg.org-chart")
        assert chart.get_attribute("role") == "img"
        assert "1 ticket sold" in (chart.get_attribute("aria-label") or "")
        assert page.locator(".org-sales table.sr-only tbody tr").count() == 1
        shot(page, "organizer-stats")

        # Cancelled after a confirmation that tells what happens to the bookings: refunded.
        page.get_by_role("button", name="Cancel event…").click()
        expect(page.get_by_text("Every confirmed booking is refunded in full")).to_be_visible()
        page.get_by_role("button", name="Yes, cancel the event").click()
        page.locator(".badge[data-status=cancelled]").wait_for()
        expect(page.locator("[data-stat=refunds]")).to_contain_text("1 done", timeout=30000)
        assert problems == []
    finally:
        context.close()


def test_an_invalid_venue_shows_the_api_error_and_creates_nothing(chromium, site: Site):
    organizer = site.register("organizer")
    context = chromium.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        problems = watch_console(page)
        sign_in(page, site, organizer)
        page.goto(f"{site.url}/#/organizer/venues/new")
        fill_venue(page, timezone="Mars/Olympus_Mons")
        page.get_by_role("button", name="Create venue").click()
        alert = page.locator(".error[data-code=validation_error]")
        alert.wait_for()
        assert "timezone: not an IANA time zone" in alert.inner_text()
        assert page.get_by_label("Timezone").get_attribute("aria-invalid") == "true"
        assert page.url.endswith("#/organizer/venues/new")
        assert site.api("GET", "/users/me/venues", organizer)["items"] == []

        # Two sections of one name: the server's words again, and still nothing made.
        page.get_by_label("Timezone").fill("Europe/Oslo")
        page.locator("fieldset[data-section='1']").get_by_label("Section name").fill("Stalls")
        page.get_by_role("button", name="Create venue").click()
        page.get_by_text("Section names must be unique within a venue.").wait_for()
        assert site.api("GET", "/users/me/venues", organizer)["items"] == []
        # The browser reports each refused request; nothing else may go wrong.
        refused = "Failed to load resource: the server responded with a status of 422"
        assert [p for p in problems if not p.startswith(refused)] == []
    finally:
        context.close()


def test_the_pages_are_for_organizers(chromium, site: Site):
    buyer = site.register(name="Bea")
    context = chromium.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        problems = watch_console(page)
        sign_in(page, site, buyer)
        page.goto(f"{site.url}/#/organizer")
        page.get_by_text("needs an organizer account").wait_for()
        link = page.get_by_role("link", name="Sign up as an organizer")
        assert (link.get_attribute("href") or "").startswith("#/signup")
        assert page.get_by_role("link", name="New venue").count() == 0
        assert problems == []
    finally:
        context.close()
