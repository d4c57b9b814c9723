"""Every Redis key and channel name Bilten uses, in one place."""

from __future__ import annotations

PREFIX = "bilten"
INSTANCES = f"{PREFIX}:instances"  # sorted set: instance id -> last heartbeat (unix time)


def instance(instance_id: str) -> str:
    """Hash describing one live instance; expires unless its heartbeat renews it."""
    return f"{PREFIX}:instance:{instance_id}"


def rate_limit(name: str, subject: str) -> str:
    """Counter of one fixed window of limit ``name`` for ``subject`` (an email, an IP)."""
    return f"{PREFIX}:rl:{name}:{subject}"


CATALOG_CHANGED = f"{PREFIX}:catalog:changed"  # pub/sub: an event id whose caches are stale


def seat_map(event_id: str, version: int) -> str:
    """The encoded seat map of an event at one version (immutable, so safely shared)."""
    return f"{PREFIX}:seatmap:{event_id}:{version}"
