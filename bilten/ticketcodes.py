"""Ticket codes: a ticket id and its event id, signed with the event's Ed25519 key.

A code is ``base64url(ticket id ‖ event id ‖ signature)``: 96 bytes, 128 characters, small enough
for a QR code. A scanner holding the event's public key (``GET /events/{id}/ticket-key``) can
tell a forged or altered code offline; the server checks the same signature before it looks at
the database. Each event has its own key pair, made when its first ticket is issued.
"""

from __future__ import annotations

import base64
import functools
import re
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bilten.db import Connection
from bilten.sealing import Keyring

ID_BYTES = 32
SIGNATURE_BYTES = 64
CODE_LENGTH = 128  # characters: 96 bytes in unpadded URL-safe base64


@dataclass(frozen=True)
class Parsed:
    ticket_id: str
    event_id: str
    message: bytes
    signature: bytes


_CODE = re.compile(r"[A-Za-z0-9_-]+")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def sign(key: Ed25519PrivateKey, ticket_id: str, event_id: str) -> str:
    message = uuid.UUID(ticket_id).bytes + uuid.UUID(event_id).bytes
    return b64(message + key.sign(message))


@functools.lru_cache(maxsize=16)
def _key(private: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(private)


def sign_many(private: bytes, event_id: str, ticket_ids: list[str]) -> list[str]:
    """The codes of an event's tickets, ``private`` its raw key: pure work (some 30 µs a
    ticket), which the booking worker leaves to its helper process (:mod:`bilten.helper`)."""
    key = _key(private)
    return [sign(key, ticket_id, event_id) for ticket_id in ticket_ids]


def parse(code: str) -> Parsed | None:
    """The parts of a well-formed code (not yet verified), else None: exactly the characters
    :func:`sign` writes (``urlsafe_b64decode`` alone would skip others, and take padding)."""
    if len(code) != CODE_LENGTH or not _CODE.fullmatch(code):
        return None
    raw = base64.urlsafe_b64decode(code + "=" * (-len(code) % 4))
    if len(raw) != ID_BYTES + SIGNATURE_BYTES:
        return None
    message = raw[:ID_BYTES]
    return Parsed(
        str(uuid.UUID(bytes=message[:16])),
        str(uuid.UUID(bytes=message[16:])),
        message,
        raw[ID_BYTES:],
    )


def verify(public_key: bytes, parsed: Parsed) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(parsed.signature, parsed.message)
    except (InvalidSignature, ValueError):
        return False
    return True


async def private_key(conn: Connection, keys: Keyring, event_id: str) -> Ed25519PrivateKey:
    """The event's signing key, made on first use (concurrent first uses agree on one). It is
    kept sealed (:mod:`bilten.sealing`); one kept in plaintext or under an old key is sealed
    again under the current key here."""
    sealed = await conn.fetchval("SELECT private_key FROM event_keys WHERE event_id = $1", event_id)
    if sealed is None:
        key = Ed25519PrivateKey.generate()
        await conn.execute(
            """INSERT INTO event_keys (event_id, private_key, public_key) VALUES ($1, $2, $3)
               ON CONFLICT (event_id) DO NOTHING""",
            event_id,
            keys.seal(key.private_bytes_raw()),
            key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )
        sealed = await conn.fetchval(
            "SELECT private_key FROM event_keys WHERE event_id = $1", event_id
        )
    raw, stale = keys.open(bytes(sealed))
    if stale:
        await conn.execute(
            "UPDATE event_keys SET private_key = $2 WHERE event_id = $1 AND private_key = $3",
            event_id,
            keys.seal(raw),
            bytes(sealed),
        )
    return Ed25519PrivateKey.from_private_bytes(raw)


async def public_key(conn: Connection, event_id: str) -> bytes | None:
    raw = await conn.fetchval("SELECT public_key FROM event_keys WHERE event_id = $1", event_id)
    return bytes(raw) if raw is not None else None
