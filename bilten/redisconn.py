"""The Redis client for ``BILTEN_REDIS_URL`` (:mod:`bilten.redisurl`): one server, a
Sentinel-watched primary, or a Redis Cluster. Everything else takes the client built here and
does not care which.

* One server: a blocking pool, so a burst waits for a connection rather than failing.
* A cluster: redis-py's cluster client. It keeps a pool per node of at most
  ``max_connections`` and does not wait for one: past that a command fails (the door answers
  503). Pipelines are split by node; Bilten keeps every script and transaction in one slot.
* Sentinel: the primary's address is asked of the Sentinels again after every lost
  connection, so a failover (or a restart) is followed.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from bilten import redisurl

TIMEOUT = 5  # seconds to connect, and to wait for a pooled connection


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (it asks where the primary is) that waits for a free connection, as the
    one-server pool does."""


class SentinelRedis(Redis):
    """The primary's client; closing it closes the Sentinels' connections too (redis-py leaves
    them open)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = cast(SentinelConnectionPool, self.connection_pool)
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def client(url: str, *, max_connections: int = 50, **options: Any) -> Redis:
    """The client for ``url`` (see :mod:`bilten.redisurl`). ``options`` go to every connection.

    A cluster's client is typed as a plain one: it offers the same commands, pipelines (split
    by node), scripts and pub/sub, and Bilten keeps every multi-key call within one slot.
    """
    target = redisurl.parse(url)
    options.setdefault("socket_connect_timeout", TIMEOUT)
    if target.kind == "server":
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=TIMEOUT, **options
        )
        return Redis.from_pool(pool)  # closing the client closes the pool
    options.update(username=target.username, password=target.password)
    if target.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=max_connections,
            ssl=target.tls,
            **options,
        )
        return cast(Redis, cluster)
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes), sentinel_kwargs={**sentinel_options, "ssl": target.tls}
    )
    primary: Redis = sentinels.master_for(
        target.service,
        redis_class=SentinelRedis,
        connection_pool_class=BlockingSentinelPool,
        max_connections=max_connections,
        timeout=TIMEOUT,
        db=target.db,
        ssl=target.tls,
        **options,
    )
    return primary
