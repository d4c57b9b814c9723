"""Redis calls from many concurrent requests (the door's script, status reads), sent together
as one pipeline.

The calls made in one turn of the event loop go out as one pipeline on one connection
(:mod:`bilten.batching`): one round trip for all of them, while each caller still gets its own
reply or error; a burst of a thousand requests needs one pooled connection, not a thousand.
On a Redis Cluster the pipeline is split by node (each script's keys share one slot), one
round trip per node, sent at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from bilten.batching import Batcher

# What redis-py's asyncio client may raise instead of ConnectionError when it writes to a
# connection closed under it (a reset by the peer, a cluster node failing over while the
# connection is set up): the transport's own errors (redis/redis-py#4287). For the door they are
# a lost connection, answered 503 like any other, not a 500.
_LOST = (AttributeError, TypeError)

Arg = str | bytes | int | float
# A script (its text and SHA1, its keys and arguments), or a plain command (no script, no sha:
# the arguments are the command; ``ONCE`` for a sha: an idempotent one, see ``command_once``).
Call = tuple[str, str, Sequence[Arg], Sequence[Arg]]
ONCE = "once"


class AutoPipeline(Batcher[Call, Any]):
    def __init__(self, redis: Redis) -> None:
        super().__init__()
        self.redis = redis

    async def script(self, script: str, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA sha`` with the next pipeline (the script is loaded first if Redis does not
        know it yet); returns its reply or raises its error."""
        return await self.call((script, sha, keys, args))

    async def command(self, *args: Arg) -> Any:
        """A plain command with the next pipeline; returns its reply or raises its error."""
        return await self.call(("", "", (), args))

    async def command_once(self, *args: Arg) -> Any:
        """An idempotent command (``SADD``, say) with the next pipeline: the same command asked
        for by several callers of one pipeline is sent once, and each gets its reply."""
        return await self.call(("", ONCE, (), args))

    async def handle(self, calls: list[Call]) -> list[Any]:
        unique: list[Call] = []
        where: list[int] = []  # each call's place in ``unique``
        once: dict[tuple[Arg, ...], int] = {}
        for call in calls:
            if call[1] == ONCE:
                found = once.get(tuple(call[3]))
                if found is None:
                    found = once[tuple(call[3])] = len(unique)
                    unique.append(("", "", (), call[3]))
                where.append(found)
            else:
                where.append(len(unique))
                unique.append(call)
        try:
            replies = await send(self.redis, unique)
        except _LOST as error:
            raise RedisConnectionError(f"the connection to Redis was lost: {error}") from error
        return [replies[n] for n in where]


async def send(redis: Redis, calls: Sequence[Call]) -> list[Any]:
    """Send ``calls`` in one pipeline; each one's reply, or its error in its place. A script
    Redis does not know (not loaded yet, or Redis restarted, or a node new to the cluster) is
    loaded and its calls sent again."""
    replies = await _pipeline(redis, calls)
    unknown = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if unknown:
        for script in {calls[n][0] for n in unknown}:
            await redis.script_load(script)  # on a cluster: on every primary
        again = await _pipeline(redis, [calls[n] for n in unknown])
        for n, reply in zip(unknown, again, strict=True):
            replies[n] = reply
    return replies


async def _pipeline(redis: Redis, calls: Sequence[Call]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for script, sha, keys, args in calls:
            if script:
                # A plain command: redis-py's cluster pipeline refuses its evalsha method (the
                # script may be unknown to a node; send() loads it where it is missing).
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            else:
                pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))
