"""The per-IP budget's local counting (bilten.budget), against a real Redis."""

from __future__ import annotations

import asyncio
import logging
import random

import redis.asyncio as aioredis

from bilten import budget as budget_module
from bilten.budget import Budget
from bilten.settings import Rate
from tests.conftest import free_port


async def evalsha_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_far_from_the_limit_hits_are_sent_in_one_batch(redis):
    budget = Budget(redis, "t", Rate(1000, 60))
    before = await evalsha_calls(redis)
    outcomes = [await budget.hit(f"10.0.0.{n % 4}") for n in range(200)]
    assert all(o.allowed for o in outcomes)
    await budget.aclose()
    # Four subjects, one batch: four script calls for two hundred hits.
    assert await evalsha_calls(redis) - before == 4
    counts = sorted([int(await redis.get(k)) for k in await redis.keys("*:t:*")])
    assert counts == [50, 50, 50, 50]


async def test_once_over_the_limit_refusals_cost_no_round_trip(redis):
    budget = Budget(redis, "t", Rate(4, 60))
    first = [(await budget.hit("10.0.0.1")).allowed for _ in range(5)]
    assert first == [True] * 4 + [False]
    before = await evalsha_calls(redis)
    refused = [await budget.hit("10.0.0.1") for _ in range(50)]
    assert not any(o.allowed for o in refused)
    assert all(0 < o.retry_after <= 60 for o in refused)
    assert await evalsha_calls(redis) == before
    assert (await budget.hit("10.0.0.2")).allowed  # another address: its own budget
    await budget.aclose()


async def test_a_burst_near_the_limit_is_judged_exactly_in_one_call(redis):
    budget = Budget(redis, "t", Rate(40, 60))
    before = await evalsha_calls(redis)
    outcomes = await asyncio.gather(*(budget.hit("10.0.0.1") for _ in range(100)))
    assert [o.allowed for o in outcomes] == [True] * 40 + [False] * 60
    # The first half of the limit is admitted locally; the rest of the tick's hits share one
    # script call, which also carries the twenty admitted ones.
    assert await evalsha_calls(redis) - before == 1
    [counter] = await redis.keys("*:t:*")
    assert int(await redis.get(counter)) == 100
    await budget.aclose()


async def test_hits_spread_over_several_batches_admit_exactly_the_limit(redis):
    """Near the limit a hit is judged by Redis at once, on another connection than the batch
    still on its way: it must not be judged before that batch's hits are counted."""
    for round_ in range(5):
        budget = Budget(redis, f"t{round_}", Rate(40, 60), interval=0.002)
        rng = random.Random(round_)

        async def one(budget: Budget, delay: float) -> bool:
            await asyncio.sleep(delay)
            return (await budget.hit("10.0.0.1")).allowed

        allowed = await asyncio.gather(*(one(budget, rng.uniform(0, 0.03)) for _ in range(100)))
        assert sum(allowed) == 40
        await budget.aclose()


async def test_ended_windows_are_swept_and_live_ones_are_not_swept_each_batch(redis, monkeypatch):
    """A crowd behind many addresses keeps many subjects in live windows: the table of shared
    counts is swept only once it has doubled since the last sweep, not on every batch."""
    monkeypatch.setattr(budget_module, "PRUNE_ABOVE", 20)
    budget = Budget(redis, "t", Rate(1000, 60))
    for n in range(30):
        await budget.hit(f"10.0.1.{n}")
    await budget.aclose()
    # Past the threshold, nothing ended: all kept, and the next sweep waits for twice as many.
    assert len(budget.seen) == 30
    assert budget.prune_above == 60
    for n in range(20):
        await budget.hit(f"10.0.2.{n}")
    await budget.aclose()
    assert len(budget.seen) == 50
    for seen in budget.seen.values():  # their windows end
        seen.ends = 0.0
    for n in range(11):
        await budget.hit(f"10.0.3.{n}")
    await budget.aclose()
    assert sorted(budget.seen) == sorted(f"10.0.3.{n}" for n in range(11))
    assert budget.prune_above == 22  # twice the 11 kept
    assert (await budget.hit("10.0.2.0")).allowed  # a swept subject starts again from Redis
    await budget.aclose()


async def test_a_redis_outage_lets_requests_through(caplog):
    gone = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    budget = Budget(gone, "t", Rate(4, 60))
    with caplog.at_level(logging.WARNING, "bilten.budget"):
        outcomes = [await budget.hit("10.0.0.1") for _ in range(10)]
        await asyncio.sleep(0.05)
    assert all(o.allowed for o in outcomes)
    assert "API budget unavailable" in caplog.text
    await budget.aclose()
    await gone.aclose()
