"""Rooms (an event's seat map) and mailboxes (a user's personal messages) of one process.

Each has one handler on the process's pub/sub hub. A message is decoded at most once, made
once into a frame (once more for the members that name seats by index), and those same bytes
go to every local connection: a room's in passes over its members, a fraction of a
millisecond of writes at a time (see :meth:`Fanout.deliver`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import msgspec

from bilten import claimnews, keys
from bilten.realtime import indexed, messages
from bilten.realtime.connection import Connection
from bilten.realtime.history import History
from bilten.realtime.messages import Frame

log = logging.getLogger(__name__)

# How long one step of a pass writes to sockets before the loop serves anything else. A
# write costs some microseconds (mostly the kernel's), so a step is a few dozen sockets;
# the request that makes a change waits for a step at each of its turns of the loop (reading
# it, each database round trip, the relay, the pub/sub message), so steps stay short.
# Measured with 10,000 sockets and a change every 100 ms made by a hold: steps of 1,024
# sockets kept the hold 175 ms from its answer (p50), 64 sockets 33 ms, 0.5 ms 21-29 ms,
# 0.2 ms 17 ms, with no more CPU per delivery.
PASS_STEP = 0.0002  # seconds


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


class Fanout:
    """Frames for a set of connections, written in passes (see :meth:`deliver`)."""

    __slots__ = (
        "base",
        "cursor",
        "joined",
        "members",
        "order",
        "pending",
        "sending",
        "sent",
        "started",
    )

    def __init__(self) -> None:
        # Each member with how many of the frames it has been given (see ``deliver``).
        self.members: dict[Connection, int] = {}
        self.sent = 0  # frames broadcast so far
        self.pending: list[Frame] = []  # the last ones, not yet given to every member
        self.base = 0  # the number of the frame before ``pending[0]``
        self.order: list[Connection] = []  # the members as the current pass found them
        self.cursor = 0  # the next of them to visit
        self.started = 0  # ``sent`` when the current pass began
        self.sending: asyncio.Handle | None = None  # the pass's next step, when one is due
        self.joined: dict[int, bytes] = {}  # ``pending`` from a frame on, joined (this pass)

    def join(self, connection: Connection) -> None:
        """A member from now on: it gets the frames broadcast after this."""
        self.members[connection] = self.sent

    def broadcast(self, frame: Frame) -> None:
        """To every member, soon: by the pass under way, or by one that starts now."""
        self.pending.append(frame)
        self.sent += 1
        self.joined.clear()
        if self.sending is None:
            self.sending = asyncio.get_running_loop().call_soon(self.deliver)

    def deliver(self) -> None:
        """One step of a pass over the members: each is given, in one write, every frame it
        lacks, for ``PASS_STEP`` seconds at most a step, the loop serving everyone else between
        steps (the request that made the change, the next change on its way).

        A frame that comes during a pass reaches the members not yet visited with the frames
        before it, and those already visited in a next pass: while the sockets keep the hub
        busy, one write carries several changes, and the busier it is the more it carries.
        """
        self.sending = None
        if self.cursor == 0:
            # Each pass from a member drawn at random: no socket is always the last one (a
            # pass over 10,000 takes tens of milliseconds), each waits half a pass on average.
            order = list(self.members)
            start = random.randrange(len(order)) if order else 0
            self.order = order[start:] + order[:start]
            self.started = self.sent
        members = self.members
        pending = self.pending
        sent = self.sent
        base = self.base
        order = self.order
        at = self.cursor
        end = len(order)
        deadline = time.perf_counter() + PASS_STEP
        while at < end:
            connection = order[at]
            at += 1
            given = members.get(connection)
            if given is None or given >= sent:
                continue  # gone, or up to date
            members[connection] = sent
            if given == sent - 1:
                connection.offer(pending[-1])
            else:
                frames = pending[given - base :]
                joined = self.joined.get(given)
                if joined is None:
                    joined = self.joined[given] = b"".join(f.wire for f in frames)
                connection.offer_all(frames, joined)
            if time.perf_counter() >= deadline:
                break
        self.cursor = at
        loop = asyncio.get_running_loop()
        if at < end:
            self.sending = loop.call_soon(self.deliver)
            return
        # Every member has had the frames up to where this pass started.
        self.cursor = 0
        self.order = []
        del pending[: self.started - base]
        self.base = self.started
        self.joined.clear()
        if self.started < self.sent:
            self.sending = loop.call_soon(self.deliver)  # frames came meanwhile


class Room:
    """The seat map of one event: local members, recent deltas, the latest snapshot.

    Members get seat changes in one of two forms: as published (``seats`` deltas, news of
    claims), or with seats named by index (:mod:`bilten.realtime.indexed`), made once for all
    such members, and only while there are some.
    """

    __slots__ = (
        "by_id",
        "by_index",
        "channel",
        "event_id",
        "handler",
        "history",
        "index",
        "joining",
        "linger",
        "loaded_at",
        "missing",
        "news",
        "opening",
        "refreshing",
        "served",
        "snapshot",
    )

    def __init__(self, event_id: str, history: int) -> None:
        self.event_id = event_id
        self.channel = keys.seats_channel(event_id)
        self.by_id = Fanout()
        self.by_index = Fanout()
        # Seat id -> index, read from the snapshot when a member first asks for it.
        self.index: dict[str, int] | None = None
        self.history = History(history)
        self.snapshot: Snapshot | None = None
        self.missing = False  # no such event (the room goes soon after it is empty)
        self.loaded_at = 0.0  # when its event was last read (monotonic)
        self.opening: asyncio.Task[None] | None = None
        self.refreshing: asyncio.Task[Snapshot | None] | None = None
        self.joining = 0  # connections between "subscribe" and membership
        self.linger: asyncio.TimerHandle | None = None
        self.served = 0  # the event's queue counter last broadcast here
        self.handler = self.on_message
        self.news = claimnews.Gathering(event_id, self.tell_news)

    @property
    def members(self) -> int:
        return len(self.by_id.members) + len(self.by_index.members)

    @property
    def empty(self) -> bool:
        return not self.members and not self.joining

    def join(self, connection: Connection, indexed: bool = False) -> None:
        """A member from now on. It was just given the snapshot and the history (in its form:
        :meth:`catch_up`), which hold every delta broadcast so far: from the next frame on it
        gets what the others get."""
        (self.by_id if indexed else self.by_index).members.pop(connection, None)
        (self.by_index if indexed else self.by_id).join(connection)

    def leave(self, connection: Connection) -> None:
        self.by_id.members.pop(connection, None)
        self.by_index.members.pop(connection, None)

    def on_message(self, data: bytes) -> None:
        try:
            head = messages.delta_head.decode(data)
        except msgspec.DecodeError:
            head = None
        if head is not None and head.type in claimnews.TYPES:
            try:
                self.news.add(claimnews.decode(data))
            except msgspec.DecodeError:
                log.warning("malformed news of claims on %s: %r", self.channel, data[:200])
            return
        if head is None or head.version < 0:
            log.warning("malformed seat delta on %s: %r", self.channel, data[:200])
            return
        # Decoded once, wrapped once: this same object goes to every socket.
        frame = messages.frame_of(data)
        if not self.history.add(head.version, frame):
            return  # redelivered
        self.broadcast(frame, delta=True)

    def tell_news(self, claimed: list[str], released: list[str]) -> None:
        """News of the queue's claims (:mod:`bilten.claimnews`): for who watches now, not kept
        for joiners."""
        for data in self.news.frames(claimed, released):
            self.by_id.broadcast(messages.frame_of(data))
        if self.by_index.members and self.index is not None:
            data = indexed.claims(self.event_id, claimed, released, self.index)
            self.by_index.broadcast(messages.frame_of(data))

    def broadcast(self, frame: Frame, *, delta: bool = False, snapshot: bool = False) -> None:
        """To every member, soon. A ``delta`` (a frame of the history) or a ``snapshot`` goes
        to members that name seats by index in that form (they all know the seats' order: each
        had a snapshot or a seat map)."""
        self.by_id.broadcast(frame)
        if self.by_index.members:
            made = self.indexed(frame) if delta else self.whole(frame) if snapshot else frame
            if made is not None:
                self.by_index.broadcast(made)

    def indexed(self, frame: Frame) -> Frame | None:
        """A delta of the history in its indexed form, made once; None for one that is not a
        delta as the relay publishes them (logged: its members by id got it as it came)."""
        if frame.indexed is None:
            assert self.index is not None  # a member that names seats by index had a snapshot
            try:
                data = indexed.delta(frame.payload(), self.index)
            except msgspec.DecodeError:
                log.warning("seat delta on %s not as published: %r", self.channel, frame.wire[:200])
                return None
            frame.indexed = messages.frame_of(data)
        return frame.indexed

    def whole(self, snapshot: Frame) -> Frame:
        """A snapshot in its indexed form (every seat in one ``seats.indexed``), made once."""
        if snapshot.indexed is None:
            snapshot.indexed = messages.frame_of(indexed.snapshot(snapshot.payload()))
        return snapshot.indexed

    def catch_up(
        self,
        snapshot: Frame | None,
        deltas: list[Frame],
        by_index: bool,
        knows_order: bool = False,
    ) -> list[Frame]:
        """What a joiner is given before it joins: the snapshot (when it needs one) and the
        deltas it missed, in its form. A joiner by index that ``knows_order`` (it holds a seat
        map: it named its version) gets the snapshot by index too."""
        if by_index:
            if self.index is None:  # read once: an event's seats and their order never change
                assert self.snapshot is not None  # the joiner was just given it, or had it
                self.index = indexed.seat_index(self.snapshot.frame.payload())
            deltas = [made for made in map(self.indexed, deltas) if made is not None]
            if snapshot is not None and knows_order:
                snapshot = self.whole(snapshot)
        return deltas if snapshot is None else [snapshot, *deltas]


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
