"""Stripe webhook signatures, checked exactly as Stripe documents them.

``Stripe-Signature: t=<unix time>,v1=<hex>[,v1=<hex>...]``, where each ``v1`` is
HMAC-SHA256(endpoint secret, ``"<t>.<raw body>"``). Several ``v1`` values appear while a secret
is being rolled; one match is enough. The timestamp is signed too, so bounding its age stops
an old, genuine delivery from being replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated, Any

import msgspec

TOLERANCE = 300  # seconds, Stripe's own default


# The parts of an event that are read, typed: a signed event of another shape (a string where
# an object belongs, an amount that is not a number) is refused with 422, not a 500 that the
# provider would retry for days. Unknown fields are Stripe's many others, and are ignored.
class Metadata(msgspec.Struct):
    booking_id: str = ""


class PaymentError(msgspec.Struct):
    decline_code: str | None = None


Cents = Annotated[int, msgspec.Meta(ge=0, le=10**12)]


class EventObject(msgspec.Struct):
    id: str = ""
    status: str = ""
    amount: Cents = 0
    amount_refunded: Cents = 0
    currency: str = ""
    metadata: Metadata | None = None
    last_payment_error: PaymentError | None = None


class EventData(msgspec.Struct):
    object: EventObject = msgspec.field(default_factory=EventObject)


class Event(msgspec.Struct):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    type: Annotated[str, msgspec.Meta(max_length=255)] = ""
    data: EventData = msgspec.field(default_factory=EventData)


_event = msgspec.json.Decoder(dict[str, Any])


class InvalidSignature(Exception):
    """The delivery is not provably from Stripe, or not recent: answer 400."""


def sign_stripe_payload(payload: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header value Stripe would send for ``payload`` at ``timestamp``."""
    return f"t={timestamp},v1={_digest(payload, secret, timestamp)}"


def verify_stripe_signature(
    payload: bytes,
    header: str | None,
    secret: str,
    *,
    tolerance: int = TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """Check ``header`` against the raw ``payload`` and return the decoded event."""
    if not header:
        raise InvalidSignature("missing Stripe-Signature header")
    if not secret:
        raise InvalidSignature("no webhook secret configured")
    timestamp: int | None = None
    signatures: list[bytes] = []
    for item in header.split(","):
        scheme, _, value = item.strip().partition("=")
        if scheme == "t":
            if not (value.isascii() and value.isdigit()) or len(value) > 12:
                raise InvalidSignature("malformed timestamp")
            timestamp = int(value)
        elif scheme == "v1" and value:
            signatures.append(value.encode())
        # Other schemes (v0, Stripe's test-mode scheme) are ignored, as Stripe's libraries do.
    if timestamp is None or not signatures:
        raise InvalidSignature("malformed Stripe-Signature header")
    expected = _digest(payload, secret, timestamp).encode()
    # Compare with every candidate, without stopping early, in constant time each.
    if not any([hmac.compare_digest(expected, candidate) for candidate in signatures]):
        raise InvalidSignature("no matching signature")
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise InvalidSignature("timestamp outside the tolerance")
    try:
        return _event.decode(payload)
    except msgspec.DecodeError:
        raise InvalidSignature("payload is not a JSON object") from None


def _digest(payload: bytes, secret: str, timestamp: int) -> str:
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
