"""Live figures of the hub: for the instance heartbeat, Prometheus, and ``/realtime/stats``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
from redis.typing import EncodableT, FieldT

from bilten import metrics

if TYPE_CHECKING:
    from bilten.realtime.hub import Realtime


class InstanceStats(msgspec.Struct, kw_only=True):
    id: str
    host: str
    pid: int
    roles: list[str]
    uptime_seconds: float
    seen_at: float
    connections: int
    authenticated: int
    anonymous: int
    rooms: int
    messages_sent: int
    messages_received: int
    closed_slow: int
    closed_idle: int


class RealtimeStats(msgspec.Struct, kw_only=True):
    instances: list[InstanceStats]
    connections: int


_FIELDS = (
    "connections",
    "authenticated",
    "anonymous",
    "rooms",
    "messages_sent",
    "messages_received",
    "closed_slow",
    "closed_idle",
)


def figures(realtime: Realtime) -> dict[str, int]:
    counters = realtime.counters
    connections = len(realtime.connections)
    return {
        "connections": connections,
        "authenticated": realtime.authenticated,
        "anonymous": connections - realtime.authenticated,
        "rooms": len(realtime.rooms),
        "messages_sent": counters.sent,
        "messages_received": counters.received,
        "closed_slow": counters.closed_slow,
        "closed_idle": counters.closed_idle,
    }


def heartbeat_fields(realtime: Realtime) -> dict[FieldT, EncodableT]:
    """What the instance heartbeat adds to its hash in Redis."""
    return {f"ws_{name}": value for name, value in figures(realtime).items()}


def export(realtime: Realtime) -> None:
    """Bring the Prometheus series up to date (counted locally, so sending costs no lock)."""
    now = figures(realtime)
    metrics.WS_CONNECTIONS.labels("authenticated").set(now["authenticated"])
    metrics.WS_CONNECTIONS.labels("anonymous").set(now["anonymous"])
    metrics.WS_ROOMS.set(now["rooms"])
    last = realtime.exported
    for name, counter in (
        ("messages_sent", metrics.WS_MESSAGES_SENT),
        ("messages_received", metrics.WS_MESSAGES_RECEIVED),
        ("closed_slow", metrics.WS_CLOSED.labels("slow")),
        ("closed_idle", metrics.WS_CLOSED.labels("idle")),
    ):
        counter.inc(now[name] - last.get(name, 0))
        last[name] = now[name]


def _instance(entry: dict[bytes, bytes], live: dict[str, int] | None) -> InstanceStats:
    def text(name: str) -> str:
        return entry.get(name.encode(), b"").decode()

    def number(name: str) -> int:
        if live is not None:
            return live[name]
        raw = entry.get(f"ws_{name}".encode())
        return int(raw) if raw else 0

    started = float(text("started_at") or 0)
    return InstanceStats(
        id=text("id"),
        host=text("host"),
        pid=int(text("pid") or 0),
        roles=[r for r in text("roles").split(",") if r],
        uptime_seconds=round(max(0.0, time.time() - started), 3) if started else 0.0,
        seen_at=float(text("seen_at") or 0),
        **{name: number(name) for name in _FIELDS},
    )


def collect(entries: list[dict[bytes, bytes]], realtime: Realtime) -> RealtimeStats:
    """The registry's live instances; this one with its current figures."""
    me = realtime.settings.instance_id.encode()
    instances = [
        _instance(entry, figures(realtime) if entry.get(b"id") == me else None) for entry in entries
    ]
    instances.sort(key=lambda i: i.id)
    return RealtimeStats(instances=instances, connections=sum(i.connections for i in instances))
