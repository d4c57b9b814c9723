"""The Redis client for ``BILTEN_REDIS_URL`` (:mod:`bilten.redisurl`): one server, a
Sentinel-watched primary, or a Redis Cluster. Everything else takes the client built here and
does not care which.

* One server: a blocking pool, so a burst waits for a connection rather than failing.
* A cluster: redis-py's cluster client. It keeps a pool per node of at most
  ``max_connections`` and does not wait for one: past that a command fails (the door answers
  503). Pipelines are split by node; Bilten keeps every script and transaction in one slot.
* Sentinel: the primary's address is asked of the Sentinels again after every lost
  connection, so a failover (or a restart) is followed.

Commands to one server or a Sentinel-watched primary are packed by hiredis, in C, as
redis-py's blocking client does; its asyncio client packs them in Python, about ten times
slower (the door's script with its arguments: 26 µs against 2.7 µs here), which was a tenth of
an instance's CPU in a sale. A cluster's nodes keep redis-py's packer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import DataError

from bilten import redisurl

TIMEOUT = 5  # seconds to connect, and to wait for a pooled connection


def _pack(args: tuple[Any, ...]) -> bytes:
    # As redis-py's own packers: a first argument with spaces ("CONFIG GET") is split.
    if isinstance(args[0], str):
        args = tuple(args[0].encode().split()) + args[1:]
    elif b" " in args[0]:
        args = tuple(args[0].split()) + args[1:]
    try:
        return cast(bytes, hiredis.pack_command(args))
    except TypeError:
        # hiredis takes str, bytes, int and float; redis-py's packer takes buffers too.
        args = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
        try:
            return cast(bytes, hiredis.pack_command(args))
        except TypeError as error:
            raise DataError(str(error)) from error


class _PackedByHiredis:
    def pack_command(self, *args: Any) -> list[bytes]:
        return [_pack(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(_pack(tuple(command)) for command in commands)]


class _Connection(_PackedByHiredis, Connection):
    pass


class _SSLConnection(_PackedByHiredis, SSLConnection):
    pass


class _UnixConnection(_PackedByHiredis, UnixDomainSocketConnection):
    pass


class _SentinelConnection(_PackedByHiredis, SentinelManagedConnection):
    pass


class _SentinelSSLConnection(_PackedByHiredis, SentinelManagedSSLConnection):
    pass


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _Connection,
    SSLConnection: _SSLConnection,
    UnixDomainSocketConnection: _UnixConnection,
    SentinelManagedConnection: _SentinelConnection,
    SentinelManagedSSLConnection: _SentinelSSLConnection,
}


def _packed_by_hiredis(pool: Any) -> None:
    """The pool's connections pack commands with hiredis (the same bytes, made in C)."""
    pool.connection_class = _PACKED.get(pool.connection_class, pool.connection_class)


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
        _packed_by_hiredis(pool)
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
    _packed_by_hiredis(primary.connection_pool)
    return primary
