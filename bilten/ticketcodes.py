"""Ticket codes: a ticket id and its event id, signed so a scanner can tell a forged code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

SIGNATURE_BYTES = 16


def _key(secret: str) -> bytes:
    return hashlib.sha256(b"bilten ticket codes\0" + secret.encode()).digest()


def sign(ticket_id: str, event_id: str, secret: str) -> str:
    body = uuid.UUID(ticket_id).bytes + uuid.UUID(event_id).bytes
    mac = hmac.new(_key(secret), body, hashlib.sha256).digest()[:SIGNATURE_BYTES]
    return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")


def verify(code: str, secret: str) -> tuple[str, str] | None:
    """The ticket and event ids of a genuine code, else None."""
    try:
        raw = base64.urlsafe_b64decode(code + "=" * (-len(code) % 4))
    except ValueError:
        return None
    if len(raw) != 32 + SIGNATURE_BYTES:
        return None
    body, mac = raw[:32], raw[32:]
    expected = hmac.new(_key(secret), body, hashlib.sha256).digest()[:SIGNATURE_BYTES]
    if not hmac.compare_digest(mac, expected):
        return None
    return str(uuid.UUID(bytes=body[:16])), str(uuid.UUID(bytes=body[16:]))
