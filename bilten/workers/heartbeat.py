"""Each instance announces itself in Redis so operators (and the other instances) see it live."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import cast

from bilten import keys
from bilten.realtime import Realtime, stats
from bilten.state import State
from bilten.supervisor import Worker

INTERVAL = 5.0
TTL = 15  # an instance missing three beats is gone


async def beat(app: State, realtime: Realtime) -> None:
    now = time.time()
    name = keys.instance(app.settings.instance_id)
    async with app.redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            name,
            mapping={
                "id": app.settings.instance_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "roles": ",".join(sorted(app.settings.roles)),
                "started_at": app.started_at,
                "seen_at": now,
                **stats.heartbeat_fields(realtime),
            },
        )
        pipe.expire(name, TTL)
        pipe.zadd(keys.INSTANCES, {app.settings.instance_id: now})
        pipe.zremrangebyscore(keys.INSTANCES, "-inf", now - TTL)
        await pipe.execute()


async def forget(app: State) -> None:
    async with app.redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.instance(app.settings.instance_id))
        pipe.zrem(keys.INSTANCES, app.settings.instance_id)
        await pipe.execute()


def worker(app: State, realtime: Realtime, interval: float = INTERVAL) -> Worker:
    async def run(stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await beat(app, realtime)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            with contextlib.suppress(Exception):
                await forget(app)

    return run


async def live_instances(app: State) -> list[dict[bytes, bytes]]:
    ids = cast(
        list[bytes], await app.redis.zrangebyscore(keys.INSTANCES, time.time() - TTL, "+inf")
    )
    if not ids:
        return []
    async with app.redis.pipeline(transaction=False) as pipe:
        for instance_id in ids:
            pipe.hgetall(keys.instance(instance_id.decode()))
        found = await pipe.execute()
    return [entry for entry in found if entry]
