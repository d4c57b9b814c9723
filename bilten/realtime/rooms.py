"""Rooms (an event's seat map) and mailboxes (a user's personal messages) of one process.

Each has one handler on the process's pub/sub hub. A message is decoded at most once, wrapped
once as an ASGI send event, and that same object is queued on every local connection.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import msgspec

from bilten import keys
from bilten.realtime import messages
from bilten.realtime.connection import Connection
from bilten.realtime.history import History
from bilten.realtime.messages import Frame

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    mark: int  # the room history's arrival count when the map was read
    frame: Frame
    status: str
    organizer_id: str

    def visible_to(self, connection: Connection) -> bool:
        """Drafts are for their organizer and admins only."""
        return (
            self.status != "draft"
            or connection.role == "admin"
            or (connection.user_id is not None and connection.user_id == self.organizer_id)
        )


class Room:
    """The seat map of one event: local members, recent deltas, the latest snapshot."""

    __slots__ = (
        "channel",
        "event_id",
        "handler",
        "history",
        "joining",
        "linger",
        "loaded_at",
        "members",
        "missing",
        "opening",
        "outbox",
        "refreshing",
        "served",
        "snapshot",
    )

    def __init__(self, event_id: str, history: int) -> None:
        self.event_id = event_id
        self.channel = keys.seats_channel(event_id)
        self.members: set[Connection] = set()
        self.history = History(history)
        self.snapshot: Snapshot | None = None
        self.missing = False  # no such event (the room goes soon after it is empty)
        self.loaded_at = 0.0  # when its event was last read (monotonic)
        self.opening: asyncio.Task[None] | None = None
        self.refreshing: asyncio.Task[Snapshot | None] | None = None
        self.joining = 0  # connections between "subscribe" and membership
        self.linger: asyncio.TimerHandle | None = None
        self.served = 0  # the event's queue counter last broadcast here
        self.outbox: list[Frame] = []  # to every member, once the current burst is read
        self.handler = self.on_message

    @property
    def empty(self) -> bool:
        return not self.members and not self.joining

    def on_message(self, data: bytes) -> None:
        try:
            version = messages.delta_head.decode(data).version
        except msgspec.DecodeError:
            log.warning("malformed seat delta on %s: %r", self.channel, data[:200])
            return
        # Decoded once, wrapped once: this same object goes to every socket.
        frame = messages.frame_of(data)
        if not self.history.add(version, frame):
            return  # redelivered
        self.broadcast(frame)

    def broadcast(self, frame: Frame) -> None:
        self.outbox.append(frame)
        if len(self.outbox) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what came in one burst (the relay publishes in batches) socket by socket, in
        one write to each when its socket takes it at once."""
        frames, self.outbox = self.outbox, []
        if not frames:
            return
        if len(frames) == 1:
            # A copy: a connection that overflows leaves the room on the spot.
            for connection in tuple(self.members):
                connection.offer(frames[0])
            return
        # Joined once for every socket: one write each instead of one per frame.
        joined = b"".join(frame.wire for frame in frames)
        for connection in tuple(self.members):
            connection.offer_all(frames, joined)


class Mailbox:
    """The personal channel of one user with connections here."""

    __slots__ = ("channel", "connections", "handler", "user_id")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.channel = keys.user_channel(user_id)
        # Mostly one or two: a list is a quarter of the size of a small set.
        self.connections: list[Connection] = []
        self.handler = self.on_message

    def on_message(self, data: bytes) -> None:
        frame = messages.frame_of(data)
        for connection in tuple(self.connections):
            connection.offer(frame)
