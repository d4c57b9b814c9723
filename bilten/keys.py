"""Every Redis key and channel name Bilten uses, in one place.

Keys that one script, transaction or multi-key command touches together carry the same hash
tag (the part in braces), so that on a Redis Cluster they live in one hash slot. An event's
queue, counters, lease, seat claims, Idempotency-Keys and request statuses are tagged with the
event's tag (:func:`event_tag`); a booking request's id begins with its event's tag
(:func:`bilten.queue.new_request_id`), so its status is found from the id alone. Pub/sub
channels need no tag (regular pub/sub reaches every node of a cluster), except one published
in a transaction with a key.
"""

from __future__ import annotations

import functools
import hashlib

PREFIX = "bilten"
TAG_LENGTH = 4  # hex digits: 65,536 tags spread over the cluster's 16,384 slots
INSTANCES = f"{PREFIX}:{{instances}}"  # sorted set: instance id -> last heartbeat (unix time)


def instance(instance_id: str) -> str:
    """Hash describing one live instance; expires unless its heartbeat renews it (written in
    one transaction with :data:`INSTANCES`, hence its tag)."""
    return f"{INSTANCES}:{instance_id}"


@functools.lru_cache(maxsize=4096)  # asked for on every request of a sale
def event_tag(event_id: str) -> str:
    """The hex digits that place an event's keys in one slot: a digest, so ids of any shape
    (sequential ones too) spread over the slots."""
    return hashlib.sha1(event_id.encode()).hexdigest()[:TAG_LENGTH]


def _event(event_id: str) -> str:
    return f"{PREFIX}:{{ev:{event_tag(event_id)}}}"


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
# Revoked in a transaction that also announces them: key and channel share a tag.
REVOKED_SESSIONS = f"{PREFIX}:{{sessions}}:revoked"  # sorted set: sid -> until (unix seconds)
REVOKED_CHANNEL = f"{PREFIX}:{{sessions}}:ended"  # pub/sub: revoked sids


def queue(event_id: str) -> str:
    """Stream of booking requests for one event, in arrival order."""
    return f"{_event(event_id)}:q:{event_id}"


def queue_ticket(event_id: str) -> str:
    """Counter: requests ever enqueued for the event (a request's place in line)."""
    return f"{_event(event_id)}:q:{event_id}:ticket"


def queue_served(event_id: str) -> str:
    """Counter: requests finished for the event; position = ticket - served."""
    return f"{_event(event_id)}:q:{event_id}:served"


def queue_lease(event_id: str) -> str:
    """The worker currently draining the event's queue (expires unless renewed)."""
    return f"{_event(event_id)}:q:{event_id}:lease"


def seat_claims(event_id: str) -> str:
    """Hash: seat id -> until when (unix ms) a queued request or a sale has it (a pre-check)."""
    return f"{_event(event_id)}:q:{event_id}:claims"


def units_left(event_id: str) -> str:
    """Hash: ticket type id -> "<units left> <until, unix ms>", what the event's worker found
    left of a ticket type that could not cover a request (the door refuses more until then)."""
    return f"{_event(event_id)}:q:{event_id}:units-left"


def idempotency(event_id: str, user_id: str, key: str) -> str:
    """The request a user's Idempotency-Key was first used for, for this event: "<request id>
    <body hash>". In the event's slot, so the door checks it in the script that queues; a key
    reused for another event is caught by the database's unique index instead."""
    return f"{_event(event_id)}:idem:{event_id}:{user_id}:{key}"


def booking_request(request_id: str) -> str:
    """Hash: the status of a booking request, for cheap polling. The id begins with its
    event's tag, so the status lives in the event's slot (written by the script that queues,
    and lost together with the queue, which is how recovery tells what Redis lost)."""
    return f"{PREFIX}:{{ev:{request_id[:TAG_LENGTH]}}}:req:{request_id}"


def test_payment(key: str) -> str:
    """Hash: the built-in test payment provider's ledger entry for one idempotency key."""
    return f"{PREFIX}:testpay:{key}"
