"""Builders shared by the catalog tests: users of each role, venues, events, image files."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

from PIL import Image

from bilten import db, passwords, users

PASSWORD = "a long enough password"
START = datetime(2031, 5, 1, 19, 0, tzinfo=UTC)


def iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


async def register(client, email, role="attendee"):
    """Headers carrying the new user's access token, and the user's id."""
    response = await client.post(
        "/auth/register",
        json={"email": email, "password": PASSWORD, "name": email, "role": role},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return {"Authorization": f"Bearer {body['access_token']}"}, body["user"]["id"]


async def signed_in(client, email, role="attendee"):
    return (await register(client, email, role))[0]


async def admin_signed_in(client, database_url, settings, email="admin@example.com"):
    """An admin cannot register: insert one, then log in through the API."""
    password_hash = await passwords.from_settings(settings).hash(PASSWORD)
    conn = await db.connect(database_url)
    try:
        await users.create(
            conn, email=email, password_hash=password_hash, name="Admin", role="admin"
        )
    finally:
        await conn.close()
    response = await client.post("/auth/login", json={"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    assert response.json()["user"]["role"] == "admin"
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


SECTIONS = [
    {"name": "Stalls", "rows": [{"label": "A", "seats": 4}, {"label": "B", "seats": 6}]},
    {"name": "Balcony", "rows": [{"label": "A", "seats": 3}]},
]


def venue_body(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "Konserthus",
        "address": "Munkedamsveien 14",
        "city": "Oslo",
        "country": "NO",
        "timezone": "Europe/Oslo",
        "sections": SECTIONS,
        **overrides,
    }


async def new_venue(client, auth, **overrides):
    response = await client.post("/venues", headers=auth, json=venue_body(**overrides))
    assert response.status_code == 201, response.text
    return response.json()


def event_body(venue: str, **overrides: Any) -> dict[str, Any]:
    starts = overrides.pop("starts", START)
    return {
        "title": "Spring Concert",
        "description": "An evening of chamber music.",
        "category": "Music",
        "venue_id": venue,
        "starts_at": iso(starts),
        "ends_at": iso(starts + timedelta(hours=2)),
        "currency": "EUR",
        "price_tiers": [
            {"name": "Front", "price_cents": 6000, "sections": ["Stalls"]},
            {"name": "Back", "price_cents": 3000, "sections": ["Balcony"]},
        ],
        "ticket_types": [{"name": "Standing", "price_cents": 2000, "capacity": 50}],
        **overrides,
    }


async def new_event(client, auth, venue_id, *, publish=False, **overrides):
    response = await client.post("/events", headers=auth, json=event_body(venue_id, **overrides))
    assert response.status_code == 201, response.text
    event = response.json()
    if publish:
        published = await client.post(f"/events/{event['id']}/publish", headers=auth)
        assert published.status_code == 200, published.text
        event = published.json()
    return event


def field_of(response) -> str:
    """The field a 422 names."""
    assert response.status_code == 422, response.text
    body = response.json()["error"]
    assert body["code"] == "validation_error"
    return body["details"]["fields"][0]["field"]


def png(width: int, height: int, color: str = "teal") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of the given size; it compresses to almost nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed pixels
    compressor = zlib.compressobj(6)
    block = row * 1000
    pixels = b"".join(compressor.compress(block) for _ in range(height // 1000))
    pixels += compressor.compress(row * (height % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
