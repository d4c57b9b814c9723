"""Background work yields to a sale: while a booking queue is being drained in this process,
mail (and its QR drawing) takes at most a set share of the time.

The booking worker calls :meth:`Pacer.busy` for every batch it reserves; the mail worker, after
each batch it sent, rests in proportion to how long the batch took (:meth:`Pacer.rest`): with a
share of 0.25, a batch that took 40 ms is followed by 120 ms of rest. It is a duty cycle on
wall time, so an upper bound on mail's CPU while the sale lasts; once no batch was reserved for
``HOT_FOR`` seconds, mail runs flat out again and catches up.
"""

from __future__ import annotations

import asyncio
import time

HOT_FOR = 1.0  # seconds a sale counts as going on after its last batch


class Pacer:
    def __init__(self, share: float) -> None:
        assert 0 < share <= 1
        self.share = share
        self.hot_until = 0.0

    def busy(self) -> None:
        self.hot_until = time.monotonic() + HOT_FOR

    @property
    def hot(self) -> bool:
        return time.monotonic() < self.hot_until

    def rest_for(self, spent: float) -> float:
        if self.share >= 1 or not self.hot:
            return 0.0
        return spent * (1 - self.share) / self.share

    async def rest(self, spent: float) -> None:
        pause = self.rest_for(spent)
        if pause > 0:
            await asyncio.sleep(pause)
