"""The general per-IP request budget, counted in this process and reconciled with Redis.

A Redis round trip per request would halve the cached read path, so each instance counts hits
itself and sends them to the shared fixed-window counter (:mod:`bilten.ratelimit`'s script) in
one pipelined batch every few milliseconds, reading back every subject's shared count. A
request is then judged by what this instance knows: the shared count as last read plus the
hits it has not sent yet.

* Far from the limit (less than half of it known), a request is admitted here, at no cost.
* Near it, the request is counted in Redis at once, with this instance's unsent hits, and the
  answer decides: the limit is exact where it matters.
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
PRUNE_ABOVE = 10_000  # subjects remembered before ended windows are swept out


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
        self.task: asyncio.Task[None] | None = None
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
        estimate = known + self.sending.get(subject, 0) + unsent + 1
        if estimate * 2 <= limit:
            self.pending[subject] = unsent + 1
            if self.task is None:
                self.task = asyncio.get_running_loop().create_task(self._send_soon())
            return ratelimit.Outcome(True, estimate, 0)
        self.pending.pop(subject, None)
        self._sent({subject: unsent + 1}, 1)
        try:
            count, ttl_ms = await self.script(
                keys=[keys.rate_limit(self.name, subject)],
                args=[self.rate.window * 1000, unsent + 1],
            )
        except RedisError as exc:
            self._warn(exc)
            return ratelimit.Outcome(True, 0, 0)
        finally:
            self._sent({subject: unsent + 1}, -1)
        self._saw(subject, int(count), int(ttl_ms))
        return ratelimit.Outcome(
            int(count) <= limit, int(count), max(1, math.ceil(int(ttl_ms) / 1000))
        )

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
        for subject, (count, ttl_ms) in zip(batch, answers, strict=True):
            self._saw(subject, int(count), int(ttl_ms))
        if len(self.seen) > PRUNE_ABOVE:
            now = time.monotonic()
            self.seen = {s: v for s, v in self.seen.items() if v.ends > now}

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
