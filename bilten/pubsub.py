"""One Redis pub/sub connection per process, shared by everything that listens.

Handlers are plain callables run on the event loop for each message of their channel; they must
be quick (hand work to a task or a queue). When the connection is (re)established every
``on_connect`` callback runs: anything that caches what messages invalidate must assume it
missed some.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from bilten.supervisor import Worker

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]


def publish(pipe: Pipeline, channel: str, message: bytes | str) -> None:
    """``PUBLISH`` queued on a pipeline (or a transaction). Sent as a plain command because
    redis-py's cluster pipeline refuses its ``publish`` method; on a cluster a regular PUBLISH
    reaches the subscribers of every node, whichever node it is sent to (the client sends it to
    the node of the channel's slot)."""
    pipe.execute_command("PUBLISH", channel, message)


class Hub:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.handlers: dict[str, set[Handler]] = {}
        self.on_connect: list[Callable[[], None]] = []
        self._pubsub: Any = None
        self.connected = asyncio.Event()

    async def subscribe(self, channel: str, handler: Handler) -> None:
        first = channel not in self.handlers
        self.handlers.setdefault(channel, set()).add(handler)
        if first and self._pubsub is not None:
            await self._pubsub.subscribe(channel)

    async def unsubscribe(self, channel: str, handler: Handler) -> None:
        handlers = self.handlers.get(channel)
        if handlers is None:
            return
        handlers.discard(handler)
        if not handlers:
            del self.handlers[channel]
            if self._pubsub is not None:
                await self._pubsub.unsubscribe(channel)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        channel = message["channel"].decode()
        for handler in list(self.handlers.get(channel, ())):
            try:
                handler(message["data"])
            except Exception:
                log.exception("pub/sub handler for %s failed", channel)

    def worker(self) -> Worker:
        async def read(pubsub: Any) -> None:
            async for message in pubsub.listen():
                self._dispatch(message)

        async def run(stop: asyncio.Event) -> None:
            # A cluster's client learns where the slots are on its first command; its pub/sub
            # connection (to the node of its first channel's slot) cannot be the first.
            await self.redis.ping()
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                # Something to subscribe to keeps listen() from returning at once.
                await pubsub.subscribe("bilten:hub", *self.handlers)
                self._pubsub = pubsub
                for callback in self.on_connect:
                    callback()
                self.connected.set()
                reader = asyncio.ensure_future(read(pubsub))
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait((reader, stopping), return_when=asyncio.FIRST_COMPLETED)
                for task in (reader, stopping):
                    task.cancel()
                if reader.done() and not reader.cancelled():
                    reader.result()  # a lost connection: the supervisor restarts us
            finally:
                self.connected.clear()
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

        return run
