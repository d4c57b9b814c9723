"""Seat changes for subscribers that name seats by index (``"indexed": true`` at subscribe).

A seat's index is its place in the ``seats`` list of its event's seat map (``seats.snapshot``,
``GET /events/{id}/seats``): an event's seats, and their order, never change. Where a ``seats``
delta names each seat by its 36-character id (some 60 bytes a change), these name it by a
number (some 8 bytes): a sale watched by thousands of sockets writes a sixth of the bytes.

* ``seats.indexed`` ``{event_id, version, changes: {status: [index, age, index, age, ...]}}``
  stands for a ``seats`` delta: each change as its seat's index and how far its own version is
  below the delta's (``version - age``; 0 for a change that carries none);
* ``claims.indexed`` ``{event_id, claimed: [index...], released: [index...]}`` stands for the
  ``seats.claimed`` and ``seats.released`` news of one gathering (:mod:`bilten.claimnews`);
* a ``seats.indexed`` naming every seat (each with its own version, as ``age``) stands for a
  ``seats.snapshot``, for a subscriber that knows the seats' order already: one that gave the
  version of the seat map it holds, and one that was sent a snapshot before (the snapshots
  after a lost pub/sub connection). Some 12 bytes a seat instead of some 200.

A change of a seat the index does not know (none should come: the index is read from the
event's own seat map) is left out and logged.
"""

from __future__ import annotations

import logging

import msgspec

log = logging.getLogger(__name__)


class _Seat(msgspec.Struct):
    id: str


class _Map(msgspec.Struct):
    seats: list[_Seat]


class _Change(msgspec.Struct):
    seat_id: str
    status: str
    version: int | None = None


class _SeatState(msgspec.Struct):
    status: str
    version: int


class _Snapshot(msgspec.Struct):
    event_id: str
    version: int
    seats: list[_SeatState]


class _Delta(msgspec.Struct):
    event_id: str
    version: int
    changes: list[_Change]


class SeatsIndexed(msgspec.Struct, tag_field="type", tag="seats.indexed"):
    event_id: str
    version: int
    changes: dict[str, list[int]]


class ClaimsIndexed(msgspec.Struct, tag_field="type", tag="claims.indexed"):
    event_id: str
    claimed: list[int]
    released: list[int]


_read_map = msgspec.json.Decoder(_Map).decode
_read_delta = msgspec.json.Decoder(_Delta).decode
_read_snapshot = msgspec.json.Decoder(_Snapshot).decode
_encode = msgspec.json.Encoder().encode


def seat_index(seat_map: bytes) -> dict[str, int]:
    """Each seat's index, from an encoded seat map ``{"seats": [{"id", ...}, ...], ...}``."""
    return {seat.id: n for n, seat in enumerate(_read_map(seat_map).seats)}


def delta(data: bytes, index: dict[str, int]) -> bytes:
    """A ``seats`` delta (as published) in its indexed form."""
    parsed = _read_delta(data)
    changes: dict[str, list[int]] = {}
    unknown = 0
    for change in parsed.changes:
        at = index.get(change.seat_id)
        if at is None:
            unknown += 1
            continue
        age = parsed.version - change.version if change.version is not None else 0
        changes.setdefault(change.status, []).extend((at, age))
    if unknown:
        log.warning("%d seat(s) of event %s not in its seat map", unknown, parsed.event_id)
    return _encode(SeatsIndexed(parsed.event_id, parsed.version, changes))


def snapshot(data: bytes) -> bytes:
    """A ``seats.snapshot`` (or a seat map) as one ``seats.indexed`` naming every seat."""
    parsed = _read_snapshot(data)
    changes: dict[str, list[int]] = {}
    for at, seat in enumerate(parsed.seats):
        changes.setdefault(seat.status, []).extend((at, parsed.version - seat.version))
    return _encode(SeatsIndexed(parsed.event_id, parsed.version, changes))


def claims(event_id: str, claimed: list[str], released: list[str], index: dict[str, int]) -> bytes:
    """News of claims, gathered, in its indexed form."""
    return _encode(
        ClaimsIndexed(
            event_id,
            [index[s] for s in claimed if s in index],
            [index[s] for s in released if s in index],
        )
    )
