"""Redis script calls from many concurrent requests, sent together as one pipeline.

The calls made in one turn of the event loop go out as one pipeline on one connection
(:mod:`bilten.batching`): one round trip for all of them, while each caller still gets its own
reply or error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from bilten.batching import Batcher

Arg = str | bytes | int | float
_Call = tuple[str, str, Sequence[Arg], Sequence[Arg]]


class AutoPipeline(Batcher[_Call, Any]):
    def __init__(self, redis: Redis) -> None:
        super().__init__()
        self.redis = redis

    async def script(self, script: str, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA sha`` with the next pipeline (the script is loaded first if Redis does not
        know it yet); returns its reply or raises its error."""
        return await self.call((script, sha, keys, args))

    async def handle(self, calls: list[_Call]) -> list[Any]:
        replies = await self._pipeline(calls)
        unknown = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:  # not loaded yet, or Redis restarted: load each script once, resend
            for script in {calls[n][0] for n in unknown}:
                await self.redis.script_load(script)
            again = await self._pipeline([calls[n] for n in unknown])
            for n, reply in zip(unknown, again, strict=True):
                replies[n] = reply
        return replies

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, sha, keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))
