"""Every Redis key and channel name Bilten uses, in one place."""

from __future__ import annotations

PREFIX = "bilten"
INSTANCES = f"{PREFIX}:instances"  # sorted set: instance id -> last heartbeat (unix time)


def instance(instance_id: str) -> str:
    """Hash describing one live instance; expires unless its heartbeat renews it."""
    return f"{PREFIX}:instance:{instance_id}"
