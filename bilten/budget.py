"""The general per-IP request budget, counted in this process and reconciled with Redis.

A Redis round trip per request would halve the cached read path, so each instance counts hits
itself and sends them to the shared fixed-window counter (:mod:`bilten.ratelimit`'s script) in
one pipelined batch every few milliseconds, reading back every subject's shared count. A
request is then judged by what this instance knows: the shared count as last read plus the
hits it has not sent yet.

* Far from the limit (less than half of it known), a request is admitted here, at no cost.
* Near it, the request is counted in Redis at once, with this instance's unsent hits, and the
  answer decides: the limit is exact where it matters. The near-limit requests of one subject
  that arrive in the same loop tick share one script call (a burst does not take a pooled
  connection each), sent only after any batch still carrying the subject's earlier hits.
* Once the shared count is known to be over the limit, requests are refused here until the
  window ends, without asking Redis again.

Several instances can together admit more than the limit only within one batch interval
(``interval``) of a burst that starts from nothing: each admits up to half the limit before its
first batch tells it what the others did. Redis trouble fails open, as before: the budget must
not stop the API; unsent hits are then dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bilten import keys, pipelining, ratelimit
from bilten.settings import Rate

log = logging.getLogger(__name__)

INTERVAL = 0.005  # seconds between batches (only while hits wait to be sent)
PRUNE_ABOVE = 10_000  # subjects remembered before ended windows are first swept out


@dataclass
class Asking:
    """A subject's near-limit hits that wait for one count in Redis."""

    answer: asyncio.Future[tuple[int, int] | None]  # the count after them and its TTL in ms
    hits: int = 0


@dataclass
class Seen:
    count: int  # the shared count, as last read
    ends: float  # when its window ends (time.monotonic())


class Budget:
    def __init__(self, redis: Redis, name: str, rate: Rate, interval: float = INTERVAL) -> None:
        self.redis = redis
        self.name = name
        self.rate = rate
        self.interval = interval
        self.script = redis.register_script(ratelimit.HIT_SCRIPT)
        self.pending: dict[str, int] = {}  # hits not sent yet
        self.sending: dict[str, int] = {}  # hits sent, their answer not back yet
        self.seen: dict[str, Seen] = {}
        # The next sweep of ended windows: twice what the last one kept, so that many
        # subjects in live windows (a crowd behind many addresses) are not swept every batch.
        self.prune_above = PRUNE_ABOVE
        self.asking: dict[str, Asking] = {}
        self.asks: set[asyncio.Task[None]] = set()  # kept while they run
        self.task: asyncio.Task[None] | None = None
        self.flight: tuple[dict[str, int], asyncio.Future[None]] | None = None  # batch sent
        self.warned = 0.0

    async def hit(self, subject: str) -> ratelimit.Outcome:
        limit = self.rate.limit
        if limit == 0:
            return ratelimit.Outcome(True, 0, 0)
        now = time.monotonic()
        seen = self.seen.get(subject)
        if seen is not None and seen.ends <= now:
            del self.seen[subject]
            seen = None
        known = seen.count if seen else 0
        if seen is not None and known >= limit:
            return ratelimit.Outcome(False, known, max(1, math.ceil(seen.ends - now)))
        unsent = self.pending.get(subject, 0)
        asking = self.asking.get(subject)
        estimate = known + self.sending.get(subject, 0) + unsent + 1
        if asking is None and estimate * 2 <= limit:
            self.pending[subject] = unsent + 1
            if self.task is None:
                self.task = asyncio.get_running_loop().create_task(self._send_soon())
            return ratelimit.Outcome(True, estimate, 0)
        if asking is None:
            loop = asyncio.get_running_loop()
            asking = self.asking[subject] = Asking(loop.create_future())
            task = loop.create_task(self._ask(subject, asking))
            self.asks.add(task)
            task.add_done_callback(self.asks.discard)
        asking.hits += 1
        number = asking.hits
        answer = await asyncio.shield(asking.answer)
        if answer is None:  # Redis failed: let it through
            return ratelimit.Outcome(True, 0, 0)
        count, ttl_ms = answer
        mine = count - asking.hits + number  # the group's hits are the last ones counted
        return ratelimit.Outcome(mine <= limit, mine, max(1, math.ceil(ttl_ms / 1000)))

    async def _ask(self, subject: str, asking: Asking) -> None:
        """Count one subject's near-limit hits in Redis at once, all that arrived this tick in
        one call, after the batch on its way with the subject's earlier hits (on another
        connection, Redis could take this call first and judge it without them)."""
        answer: tuple[int, int] | None = None
        try:
            await asyncio.sleep(0)
            while self.flight is not None and subject in self.flight[0]:
                await asyncio.shield(self.flight[1])
            del self.asking[subject]  # later hits form the next group
            amount = self.pending.pop(subject, 0) + asking.hits
            self._sent({subject: amount}, 1)
            try:
                count, ttl_ms = await self.script(
                    keys=[keys.rate_limit(self.name, subject)],
                    args=[self.rate.window * 1000, amount],
                )
            finally:
                self._sent({subject: amount}, -1)
            answer = (int(count), int(ttl_ms))
            self._saw(subject, *answer)
        except RedisError as exc:
            self._warn(exc)
        finally:
            if self.asking.get(subject) is asking:
                del self.asking[subject]
            asking.answer.set_result(answer)

    def _sent(self, hits: dict[str, int], sign: int) -> None:
        for subject, amount in hits.items():
            left = self.sending.get(subject, 0) + sign * amount
            if left:
                self.sending[subject] = left
            else:
                self.sending.pop(subject, None)

    def _saw(self, subject: str, count: int, ttl_ms: int) -> None:
        self.seen[subject] = Seen(count, time.monotonic() + ttl_ms / 1000)

    async def _send_soon(self) -> None:
        try:
            await asyncio.sleep(self.interval)
        finally:
            self.task = None
        batch, self.pending = self.pending, {}
        window = self.rate.window * 1000
        self._sent(batch, 1)
        landed = asyncio.get_running_loop().create_future()
        self.flight = (batch, landed)
        calls: list[pipelining.Call] = [
            (
                ratelimit.HIT_SCRIPT,
                self.script.sha,
                [keys.rate_limit(self.name, subject)],
                [window, amount],
            )
            for subject, amount in batch.items()
        ]
        try:
            answers = await pipelining.send(self.redis, calls)
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
        except RedisError as exc:
            self._warn(exc)
            return
        finally:
            self._sent(batch, -1)
            self.flight = None
            landed.set_result(None)
        for subject, (count, ttl_ms) in zip(batch, answers, strict=True):
            self._saw(subject, int(count), int(ttl_ms))
        if len(self.seen) > self.prune_above:
            now = time.monotonic()
            self.seen = {s: v for s, v in self.seen.items() if v.ends > now}
            self.prune_above = max(PRUNE_ABOVE, 2 * len(self.seen))

    def _warn(self, exc: RedisError) -> None:
        now = time.monotonic()
        if now - self.warned > 10:
            self.warned = now
            log.warning("API budget unavailable (%s); requests let through", exc)

    async def aclose(self) -> None:
        """Send what is waiting (a stopping instance's hits still count), unless Redis takes
        more than a second to take it."""
        task = self.task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 1)
