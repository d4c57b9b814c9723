"""Redis script calls from many concurrent requests, sent together.

Under load, thousands of requests each want one script call at the same moment. Sent one by
one, each waits in line for a pooled connection, then pays a round trip and redis-py's
per-call work. Here the calls made in one turn of the event loop go out as one pipeline on one
connection: one round trip for all of them, while each caller still gets its own reply or
error. A caller that gives up (is cancelled) does not take its call back: as with a single
call already sent, Redis may run it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float
_Call = tuple[str, str, Sequence[Arg], Sequence[Arg], "asyncio.Future[Any]"]


class AutoPipeline:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.pending: list[_Call] = []
        self.sending: set[asyncio.Task[None]] = set()

    async def script(self, script: str, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA sha`` with the next pipeline (the script is loaded first if Redis does not
        know it yet); returns its reply or raises its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((script, sha, keys, args, future))
        return await future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._send(batch))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._pipeline(batch)
            unknown = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if unknown:  # not loaded yet, or Redis restarted: load each script once, resend
                for script in {batch[n][0] for n in unknown}:
                    await self.redis.script_load(script)
                again = await self._pipeline([batch[n] for n in unknown])
                for n, reply in zip(unknown, again, strict=True):
                    replies[n] = reply
        except BaseException as exc:  # the connection, say: every call of the batch failed
            for *_, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # its caller gave up
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, sha, keys, args, _ in batch:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))
