"""A working request body for every JSON body the API takes, shown by ``/docs`` in try-it-out.

Keyed by the body type's name (``openapi.document`` puts each on the request bodies of that
type). Ids of things made earlier (a venue, an event, seats) are placeholders to replace.
``tests/test_ops.py`` checks that every body type has one and that each one decodes.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Any

PASSWORD = "correct horse battery staple"
SOME_ID = "00000000-0000-4000-8000-000000000000"
SECTIONS = [
    {"name": "Stalls", "rows": [{"label": "A", "seats": 8}, {"label": "B", "seats": 10}]},
    {"name": "Balcony", "rows": [{"label": "A", "seats": 6}]},
]
ADDRESS = {
    "label": "Home",
    "line1": "Karl Johans gate 1",
    "city": "Oslo",
    "postal_code": "0154",
    "country": "NO",
    "is_default": True,
}


def request_examples(today: date) -> dict[str, Any]:
    """The examples, with an event's dates in the coming year (1 June after ``today``)."""
    starts = datetime.combine(date(today.year + 1, 6, 1), time(19), UTC)
    when = {
        "starts_at": starts.isoformat().replace("+00:00", "Z"),
        "ends_at": starts.replace(hour=22).isoformat().replace("+00:00", "Z"),
        "sale_starts_at": None,
    }
    card = {"method": "card", "token": "tok_visa"}
    return {
        "RegisterBody": {
            "email": "new.organizer@example.com",
            "password": PASSWORD,
            "name": "Nora Organizer",
            "role": "organizer",
        },
        "LoginBody": {"email": "new.organizer@example.com", "password": PASSWORD},
        "RefreshBody": {"refresh_token": "the refresh_token of a sign-in"},
        "TokenBody": {"token": "the token from the mail"},
        "EmailBody": {"email": "new.organizer@example.com"},
        "ResetBody": {"token": "the token from the mail", "password": PASSWORD + " two"},
        "NewVenue": {
            "name": "Konserthus",
            "address": "Munkedamsveien 14",
            "city": "Oslo",
            "country": "NO",
            "timezone": "Europe/Oslo",
            "sections": SECTIONS,
        },
        "NewEvent": {
            "title": "Spring Concert",
            "description": "An evening of chamber music.",
            "category": "Music",
            "venue_id": SOME_ID,
            **when,
            "currency": "EUR",
            "max_tickets_per_order": 10,
            "price_tiers": [
                {"name": "Front", "price_cents": 6000, "sections": ["Stalls"]},
                {"name": "Balcony", "price_cents": 3500, "sections": ["Balcony"]},
            ],
            "ticket_types": [],
        },
        "EventPatch": {"title": "Spring Concert (second night)", "max_tickets_per_order": 6},
        "HoldIn": {"event_id": SOME_ID, "seat_ids": [SOME_ID]},
        "BookingIn": {"event_id": SOME_ID, "seat_ids": [SOME_ID], "payment": card},
        "CheckInBody": {"code": "the code of a ticket (its QR code holds it)"},
        "ProfilePatch": {"name": "Nora Nordmann", "phone": "+4791234567", "locale": "nb-NO"},
        "NewAddress": ADDRESS,
        "AddressPatch": {"line1": "Karl Johans gate 2", "is_default": True},
    }
