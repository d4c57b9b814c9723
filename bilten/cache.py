"""In-process caches of hot catalog reads, kept coherent across instances through Redis.

A change to an event (details, holds, bookings) calls :func:`changed` after it commits: the
local entry is dropped and a message on the catalog channel tells every other instance to drop
theirs. Pub/sub may lose a message while a connection is down, so entries also age out, and a
listener that (re)subscribes starts from empty caches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis

from bilten import keys
from bilten.batching import Batcher
from bilten.pubsub import Hub

log = logging.getLogger(__name__)

V = TypeVar("V")
T = TypeVar("T")

DETAIL_MAX_AGE = 5.0
SEAT_MAP_MAX_AGE = 60.0
ON_SALE_MAX_AGE = 5.0  # entries are also checked against the current version
SEATS_MAX_AGE = 600.0  # an event's seats are fixed when it is made: kept only to bound memory
MAX_ENTRIES = 2000
DROPS_MAX = 10_000  # keys whose changes are counted before the counts start over
SEAT_MAPS_MAX_BYTES = 64 << 20  # encoded seat maps: ~200 bytes a seat
SEAT_IDS_MAX_BYTES = 32 << 20  # seat id sets
SEAT_ID_BYTES = 190  # what one seat's id takes in a set (measured with tracemalloc)


@dataclass
class LocalCache(Generic[V]):
    """A bounded map whose entries expire; :meth:`token` guards loads against stale puts.

    A load takes a token before reading the database and puts with it; a drop or clear in
    between invalidates the token, so a value read before a change never outlives the change.
    """

    max_age: float
    max_entries: int = MAX_ENTRIES
    # Bytes (as ``weigh`` counts them) the entries may take together, 0 for no bound: entries
    # of very different sizes (the seat map of a 50-seat room, of a 50,000-seat stadium) are
    # not bounded by their number alone. The newest entry is kept whatever its size.
    max_weight: int = 0
    weigh: Callable[[V], int] | None = None
    weight: int = 0
    entries: OrderedDict[str, tuple[float, V, int]] = field(default_factory=OrderedDict)
    epoch: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    loading: dict[str, asyncio.Future[Any]] = field(default_factory=dict)

    def token(self, key: str) -> tuple[int, int]:
        return self.epoch, self.drops.get(key, 0)

    def get(self, key: str) -> V | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._remove(key)
            return None
        return entry[1]

    async def get_or_load(self, key: str, load: Callable[[], Awaitable[T]]) -> V | T:
        """The entry, else what ``load`` returns (it puts what should be kept); callers that
        find no entry at the same moment share one load."""
        found = self.get(key)
        if found is not None:
            return found
        running = self.loading.get(key)
        if running is None:
            running = self.loading[key] = asyncio.ensure_future(load())
            running.add_done_callback(lambda done: self.forget_load(key, done))
        result: T = await asyncio.shield(running)
        return result

    def forget_load(self, key: str, load: asyncio.Future[Any]) -> None:
        """``load`` is no longer the one to share for ``key`` (it ended, or the entry was
        dropped while it ran); a newer one is kept."""
        if self.loading.get(key) is load:
            del self.loading[key]

    def put(self, key: str, value: V, token: tuple[int, int] | None = None) -> None:
        if token is not None and token != self.token(key):
            return  # changed while it was being loaded
        self._remove(key)
        weight = self.weigh(value) if self.weigh is not None else 0
        self.entries[key] = (time.monotonic() + self.max_age, value, weight)
        self.weight += weight
        while len(self.entries) > 1 and (
            len(self.entries) > self.max_entries
            or (self.max_weight and self.weight > self.max_weight)
        ):
            self._remove(next(iter(self.entries)))  # the oldest

    def _remove(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.weight -= entry[2]

    def drop(self, key: str) -> None:
        self._remove(key)
        if len(self.drops) >= DROPS_MAX and key not in self.drops:
            # A count per key ever changed would grow for good: forget them all and start a
            # new epoch instead, which refuses the puts of every load under way (they read
            # before now), and leaves the entries, current as they are.
            self.drops.clear()
            self.epoch += 1
        self.drops[key] = self.drops.get(key, 0) + 1
        self.loading.pop(key, None)  # a load begun before the change is not shared after it

    def clear(self) -> None:
        self.entries.clear()
        self.weight = 0
        self.drops.clear()
        self.loading.clear()
        self.epoch += 1


@dataclass
class Caches:
    details: LocalCache[Any] = field(default_factory=lambda: LocalCache(DETAIL_MAX_AGE))
    seat_maps: LocalCache[Any] = field(
        default_factory=lambda: LocalCache(
            SEAT_MAP_MAX_AGE, max_weight=SEAT_MAPS_MAX_BYTES, weigh=lambda found: len(found.body)
        )
    )
    # Events on sale and their per-order limits, for the booking door: not dropped by changes
    # (every sale changes its event), only aged out; the worker checks again in the database.
    on_sale: LocalCache[int] = field(default_factory=lambda: LocalCache(ON_SALE_MAX_AGE))
    # The ids of each event's seats, for the booking door (never dropped: they never change).
    seat_ids: LocalCache[frozenset[str]] = field(
        default_factory=lambda: LocalCache(
            SEATS_MAX_AGE,
            max_entries=100,
            max_weight=SEAT_IDS_MAX_BYTES,
            weigh=lambda ids: SEAT_ID_BYTES * len(ids),
        )
    )
    # Every seat-map answer reads its map's current version; the reads of one loop turn go
    # together (bilten.seatmap.Heads, given by the app, which owns the pool).
    seat_heads: Batcher[str, Any] | None = None

    def drop(self, event_id: str) -> None:
        self.details.drop(event_id)
        self.seat_maps.drop(event_id)

    def clear(self) -> None:
        self.details.clear()
        self.seat_maps.clear()


async def changed(redis: Redis, caches: Caches, event_id: str) -> None:
    """Call after committing a change to ``event_id``: every instance forgets its cached copy."""
    caches.drop(event_id)
    try:
        await redis.publish(keys.CATALOG_CHANGED, event_id)
    except Exception:
        log.warning("could not announce a change of event %s; other instances age it out", event_id)


async def listen(hub: Hub, caches: Caches) -> None:
    """Drop cached copies when any instance announces a change."""
    hub.on_connect.append(caches.clear)  # whatever changed while we were not listening
    await hub.subscribe(keys.CATALOG_CHANGED, lambda data: caches.drop(data.decode()))
