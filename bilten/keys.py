"""Every Redis key and channel name Bilten uses, in one place."""

from __future__ import annotations

import hashlib

PREFIX = "bilten"
INSTANCES = f"{PREFIX}:instances"  # sorted set: instance id -> last heartbeat (unix time)


def instance(instance_id: str) -> str:
    """Hash describing one live instance; expires unless its heartbeat renews it."""
    return f"{PREFIX}:instance:{instance_id}"


def login_known(email: str, ip: str) -> str:
    """Set when ``email`` signed in from ``ip``: that address is spared the per-email ceiling."""
    digest = hashlib.sha256(f"{email}|{ip}".encode()).hexdigest()[:32]
    return f"{PREFIX}:login-known:{digest}"


def rate_limit(name: str, subject: str) -> str:
    """Counter of one fixed window of limit ``name`` for ``subject`` (an email, an IP)."""
    return f"{PREFIX}:rl:{name}:{subject}"


CATALOG_CHANGED = f"{PREFIX}:catalog:changed"  # pub/sub: an event id whose caches are stale


def seat_map(event_id: str, tag: str) -> str:
    """The encoded seat map of an event at one version tag (immutable, so safely shared)."""
    return f"{PREFIX}:seatmap:{event_id}:{tag}"


def seats_channel(event_id: str) -> str:
    """Pub/sub: seat-map deltas of one event (the realtime room ``event:{id}``)."""
    return f"{PREFIX}:room:event:{event_id}"


def user_channel(user_id: str) -> str:
    """Pub/sub: personal messages for one user (booking results, payment status)."""
    return f"{PREFIX}:room:user:{user_id}"


BOOKING_DONE = f"{PREFIX}:booking:done"  # pub/sub: lines "<request id> <outcome JSON>"
QUEUE_ACTIVE = f"{PREFIX}:q:active"  # set of events whose booking queue may hold requests
QUEUE_GROUP = "bookers"
REVOKED_SESSIONS = f"{PREFIX}:sessions:revoked"  # sorted set: sid -> until (unix seconds)
REVOKED_CHANNEL = f"{PREFIX}:sessions:ended"  # pub/sub: revoked sids


def queue(event_id: str) -> str:
    """Stream of booking requests for one event, in arrival order."""
    return f"{PREFIX}:q:{event_id}"


def queue_ticket(event_id: str) -> str:
    """Counter: requests ever enqueued for the event (a request's place in line)."""
    return f"{PREFIX}:q:{event_id}:ticket"


def queue_served(event_id: str) -> str:
    """Counter: requests finished for the event; position = ticket - served."""
    return f"{PREFIX}:q:{event_id}:served"


def queue_lease(event_id: str) -> str:
    """The worker currently draining the event's queue (expires unless renewed)."""
    return f"{PREFIX}:q:{event_id}:lease"


def seat_claims(event_id: str) -> str:
    """Hash: seat id -> until when (unix ms) a queued request or a sale has it (a pre-check)."""
    return f"{PREFIX}:q:{event_id}:claims"


def idempotency(user_id: str, key: str) -> str:
    """The request a user's Idempotency-Key was first used for: "<request id> <body hash>"."""
    return f"{PREFIX}:idem:{user_id}:{key}"


def booking_request(request_id: str) -> str:
    """Hash: the status of a booking request, for cheap polling."""
    return f"{PREFIX}:req:{request_id}"


def test_payment(key: str) -> str:
    """Hash: the built-in test payment provider's ledger entry for one idempotency key."""
    return f"{PREFIX}:testpay:{key}"
