"""The recent seat-map deltas of one event, sorted by version, for clients that (re)subscribe.

Deltas may arrive more than once and slightly out of version order (versions are taken before
commit, so transactions commit in any order): they are inserted in place, duplicates dropped,
and each remembers when it arrived. A client that had version ``v`` has missed every delta
above ``v`` and every one that arrived after ``v`` did, whatever its version; a snapshot read
at some moment misses what arrived after that moment and is above it or late.

``floor`` says how far back the history is complete: every delta above it is here. It is None
until a snapshot anchors the history, and again after the pub/sub connection was lost.
"""

from __future__ import annotations

import bisect

from bilten.realtime.messages import Frame


class History:
    __slots__ = ("arrivals", "clock", "floor", "frames", "limit", "versions")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.versions: list[int] = []
        self.frames: list[Frame] = []
        self.arrivals: list[int] = []
        self.clock = 0  # arrivals so far
        self.floor: int | None = None

    def __len__(self) -> int:
        return len(self.versions)

    @property
    def latest(self) -> int | None:
        return self.versions[-1] if self.versions else None

    def add(self, version: int, frame: Frame) -> bool:
        """Keep a delta; False when it is one already seen (a redelivery)."""
        at = bisect.bisect_right(self.versions, version)
        before = at - 1
        while before >= 0 and self.versions[before] == version:
            if self.frames[before].wire == frame.wire:
                return False
            before -= 1
        self.clock += 1
        self.versions.insert(at, version)
        self.frames.insert(at, frame)
        self.arrivals.insert(at, self.clock)
        if len(self.versions) > self.limit:
            dropped = self.versions.pop(0)
            del self.frames[0], self.arrivals[0]
            if self.floor is not None:
                self.floor = max(self.floor, dropped)
        return True

    def reaches(self, version: int) -> bool:
        """Whether every delta after ``version`` is here."""
        return self.floor is not None and version >= self.floor

    def after(self, version: int, mark: int | None = None) -> list[Frame]:
        """What a client at ``version`` lacks, in version order.

        ``mark``: the arrival count when the client's state was read (a snapshot); without
        it, when the delta of ``version`` itself arrived, if it is here.
        """
        start = bisect.bisect_right(self.versions, version)
        if mark is None:
            at = start - 1
            while at >= 0 and self.versions[at] == version:
                mark = self.arrivals[at] if mark is None else max(mark, self.arrivals[at])
                at -= 1
        if mark is None:
            return self.frames[start:]
        late = [
            f for f, a in zip(self.frames[:start], self.arrivals[:start], strict=True) if a > mark
        ]
        return late + self.frames[start:]

    def count_after(self, version: int) -> int:
        return len(self.versions) - bisect.bisect_right(self.versions, version)

    def anchor(self, version: int) -> None:
        """Complete above ``version`` from now on (a snapshot at it was read after subscribing)."""
        self.floor = version

    def forget(self) -> None:
        """Deltas may have been missed: nothing reaches back until the next anchor."""
        self.floor = None
        self.versions.clear()
        self.frames.clear()
        self.arrivals.clear()
