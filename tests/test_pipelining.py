"""Script calls of concurrent callers share one pipeline, each with its own answer."""

import asyncio
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import DataError

from bilten.pipelining import AutoPipeline

# Appends ARGV[1] to a list and returns its new length; errors when ARGV[1] is "boom".
SCRIPT = """
if ARGV[1] == 'boom' then return redis.error_reply('BOOM asked for') end
return redis.call('RPUSH', KEYS[1], ARGV[1])
"""
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


async def test_concurrent_calls_go_out_together_and_each_gets_its_answer(redis):
    await redis.script_flush()  # the first pipeline meets NOSCRIPT: loaded, then sent again
    pipeline = AutoPipeline(redis)
    replies = await asyncio.gather(
        *(pipeline.script(SCRIPT, SHA, ["list"], [str(n)]) for n in range(200)),
        pipeline.script(SCRIPT, SHA, ["list"], ["boom"]),
        return_exceptions=True,
    )
    *lengths, error = replies
    assert sorted(lengths) == list(range(1, 201))
    assert isinstance(error, Exception) and "BOOM" in str(error)
    assert await redis.lrange("list", 0, -1) == [str(n).encode() for n in range(200)]
    # Loaded now: the next burst is EVALSHAs only (each counts its RPUSH too), and all of them
    # went over one connection, where 100 separate concurrent calls would have opened 100.
    mark = (await redis.info("stats"))["total_commands_processed"]
    more = await asyncio.gather(
        *(pipeline.script(SCRIPT, SHA, ["list"], [str(n)]) for n in range(200, 300))
    )
    assert more == list(range(201, 301))
    after = (await redis.info("stats"))["total_commands_processed"]
    assert after - mark == 2 * 100 + 1  # and the INFO that counted them
    pool = redis.connection_pool  # this client's: the server may have others
    assert len(pool._available_connections) + len(pool._in_use_connections) <= 2


async def test_a_caller_that_gives_up_leaves_the_others_answered(redis):
    pipeline = AutoPipeline(redis)
    gone = asyncio.ensure_future(pipeline.script(SCRIPT, SHA, ["gone"], ["a"]))
    kept = asyncio.ensure_future(pipeline.script(SCRIPT, SHA, ["gone"], ["b"]))
    while not pipeline.running:  # until the batch is on its way
        await asyncio.sleep(0)
    gone.cancel()
    assert await kept == 2
    assert gone.cancelled()
    # Sent before its caller gave up, the call still ran, as a single call would have.
    assert await redis.lrange("gone", 0, -1) == [b"a", b"b"]
    await asyncio.sleep(0)
    assert not pipeline.running and not pipeline.pending


async def test_a_failed_connection_fails_every_call_of_the_batch(redis_url):
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    pipeline = AutoPipeline(unreachable)
    replies = await asyncio.gather(
        *(pipeline.script(SCRIPT, SHA, ["x"], [str(n)]) for n in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(r, RedisConnectionError) for r in replies), replies
    await unreachable.aclose()


async def test_an_idempotent_command_asked_by_many_callers_of_one_pipeline_is_sent_once(redis):
    pipeline = AutoPipeline(redis)
    mark = (await redis.info("stats"))["total_commands_processed"]
    replies = await asyncio.gather(
        *(pipeline.command_once("SADD", "active", "e1") for _ in range(50)),
        *(pipeline.command_once("SADD", "active", "e2") for _ in range(50)),
        pipeline.command("SADD", "active", "e1"),  # not marked: sent as asked
        pipeline.command_once("SADD", "active", "e1", "e3"),
    )
    after = (await redis.info("stats"))["total_commands_processed"]
    assert after - mark == 4 + 1  # and the INFO that counted them
    assert replies[:50] == [1] * 50 and replies[50:100] == [1] * 50
    assert replies[100:] == [0, 1]
    assert await redis.smembers("active") == {b"e1", b"e2", b"e3"}


async def test_plain_commands_of_concurrent_callers_share_the_pipeline(redis):
    """Status reads (HGETALL, GET) of a burst of requests go out with one pipeline: each
    caller gets its own reply, a bad command fails only its caller."""
    pipeline = AutoPipeline(redis)
    await redis.hset("status:1", mapping={"status": "queued", "ticket": 7})
    await redis.set("served", 3)
    pool = redis.connection_pool
    replies = await asyncio.gather(
        *(pipeline.command("HGETALL", "status:1") for _ in range(100)),
        *(pipeline.command("GET", "served") for _ in range(100)),
        pipeline.command("HGETALL", "served"),  # the wrong type: an error for this one alone
        return_exceptions=True,
    )
    assert replies[:100] == [{b"status": b"queued", b"ticket": b"7"}] * 100
    assert replies[100:200] == [b"3"] * 100
    assert isinstance(replies[200], Exception) and "WRONGTYPE" in str(replies[200])
    # One connection was enough (this client's pool; the server may have other clients).
    opened = len(pool._available_connections) + len(pool._in_use_connections)
    assert opened == 1


_ARG = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(st.lists(_ARG, min_size=1, max_size=12))
def test_hiredis_packs_commands_as_redis_py_does(args):
    """The client's connections pack with hiredis; the bytes are redis-py's own."""
    from redis.asyncio.connection import Connection

    from bilten import redisconn

    ours = redisconn._Connection()
    theirs = Connection()
    command = ("EVALSHA", *args)
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))
    assert b"".join(ours.pack_commands([command, ("GET", *args)])) == b"".join(
        theirs.pack_commands([command, ("GET", *args)])
    )


async def test_the_client_sends_every_kind_of_argument_through_hiredis(redis_url):
    from bilten import redisconn

    client = redisconn.client(redis_url)
    try:
        assert issubclass(client.connection_pool.connection_class, redisconn._PackedByHiredis)
        value = bytes(range(256)) + "ünïcode €".encode()
        await client.set("bilten:test:packed", memoryview(value))
        assert await client.get("bilten:test:packed") == value
        await client.execute_command("CONFIG GET", "maxmemory")  # a command name with a space
        assert await client.incrbyfloat("bilten:test:float", 1.5) == 1.5
        await client.delete("bilten:test:packed", "bilten:test:float")
        with pytest.raises(DataError):
            await client.set("bilten:test:packed", None)  # type: ignore[arg-type]
    finally:
        await client.aclose()


async def test_a_transport_error_from_redis_py_is_a_lost_connection(redis, monkeypatch):
    """redis-py's asyncio client may raise the transport's own AttributeError when it writes to
    a connection closed under it (as seen during a cluster failover); every caller of the batch
    gets a ConnectionError (the door answers 503), and the next batch goes through."""
    from redis.asyncio.client import Pipeline
    from redis.exceptions import ConnectionError as RedisConnectionError

    pipeline = AutoPipeline(redis)
    real = Pipeline.execute

    async def broken(self, raise_on_error=True):
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    monkeypatch.setattr(Pipeline, "execute", broken)
    results = await asyncio.gather(
        pipeline.command("PING"), pipeline.command("PING"), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    monkeypatch.setattr(Pipeline, "execute", real)
    assert await pipeline.command("PING") is True
