"""Seats asked for by queued bookings, told to the seat map's watchers before they are sold.

A booking request claims its seats at the door (:func:`bilten.queue.submit`) and sells them a
few hundred milliseconds later, when a worker reaches it. Until then the seat map still shows
them available, and in a rush everyone watching it picks among seats already taken: each such
pick is a 409 and another try, and once most of what the map shows is claimed, a storm of them.
So the room is told:

* ``seats.claimed`` ``{event_id, seat_ids}``: published by the door's script, in the same step
  as the claim;
* ``seats.released`` ``{event_id, seat_ids}``: published by the worker when it gives claimed
  seats back unsold (the booking failed; :func:`bilten.queue.settle_claims`).

Both go through Redis on the event's seats channel, so every instance's room hears them in the
order they happened (a release is published after the claim it undoes). Each room gathers them
for :data:`INTERVAL` and sends each seat's latest news, claimed seats in one frame and released
ones in another: however fast a sale goes, its watchers get at most two such frames per
interval.

Neither message has a version: they are news about the queue, not changes of the seat map, and
neither a snapshot nor the history given to a joiner holds them. A client keeps claimed seats
apart from the map's statuses (shows them held while the map says available) and forgets a
claim when the seat is released or a ``seats`` delta names it, and every claim when a snapshot
comes (one follows any gap, such as a lost pub/sub connection, in which a release may have been
missed). A claim missed (a Redis outage, a client that joined later) costs a 409 at most.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
from redis.asyncio.client import Pipeline

from bilten import keys, pubsub

INTERVAL = 0.02  # seconds a room gathers news of claims before telling its members


class Claimed(msgspec.Struct, tag_field="type", tag="seats.claimed"):
    event_id: str
    seat_ids: list[str]


class Released(msgspec.Struct, tag_field="type", tag="seats.released"):
    event_id: str
    seat_ids: list[str]


News = Claimed | Released
TYPES = frozenset({"seats.claimed", "seats.released"})  # the tags above, as messages carry them
decode = msgspec.json.Decoder(News).decode
encode = msgspec.json.Encoder().encode


def released(pipe: Pipeline, event_id: str, seat_ids: list[str]) -> None:
    """Tell the event's room, on the caller's pipeline, that these claims were given up."""
    pubsub.publish(pipe, keys.seats_channel(event_id), encode(Released(event_id, seat_ids)))


class Gathering:
    """One room's news of claims, gathered for :data:`INTERVAL`, then told with
    ``tell(claimed, released)``: each seat's latest news, seat ids in the order first heard."""

    __slots__ = ("event_id", "interval", "seats", "tell", "timer")

    def __init__(
        self,
        event_id: str,
        tell: Callable[[list[str], list[str]], None],
        interval: float = INTERVAL,
    ) -> None:
        self.event_id = event_id
        self.tell = tell
        self.interval = interval
        self.seats: dict[str, bool] = {}  # seat -> claimed (True) or released (False)
        self.timer: asyncio.TimerHandle | None = None

    def add(self, news: News) -> None:
        claimed = isinstance(news, Claimed)
        seats = self.seats
        for seat in news.seat_ids:
            seats[seat] = claimed  # each tells how the seat stands now: the last one counts
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        self.timer = None
        seats, self.seats = self.seats, {}
        if seats:
            self.tell(
                [seat for seat, taken in seats.items() if taken],
                [seat for seat, taken in seats.items() if not taken],
            )

    def frames(self, claimed: list[str], released: list[str]) -> list[bytes]:
        """The news as messages: claims first, then releases (none for an empty list)."""
        out = []
        if claimed:
            out.append(encode(Claimed(self.event_id, claimed)))
        if released:
            out.append(encode(Released(self.event_id, released)))
        return out

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.seats.clear()
