"""Rate limits shared by every instance: fixed windows counted atomically in Redis.

One Lua script increments a window's counter and reads its remaining time in one step, so
concurrent requests on any number of instances never slip past a limit.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from bilten import keys
from bilten.errors import ApiError
from bilten.settings import Rate


def subject(address: str) -> str:
    """Who a per-address limit counts: an IPv4 address as it is, an IPv6 one by its /64 (what
    one home or one host is given: a client that may take any address in it would otherwise
    have a fresh budget for every request); an IPv4 address written as IPv6 as the IPv4 one."""
    return address if ":" not in address else _ipv6_subject(address)


@functools.lru_cache(maxsize=4096)
def _ipv6_subject(address: str) -> str:
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


# KEYS[1] counter; ARGV[1] window in ms; ARGV[2] amount to add (0 reads, negative refunds).
HIT_SCRIPT = """
local n = redis.call('INCRBY', KEYS[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


_HIT_SHA = hashlib.sha1(HIT_SCRIPT.encode()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    count: int
    retry_after: int  # seconds until the window ends


async def hit(redis: Redis, name: str, subject: str, rate: Rate, amount: int = 1) -> Outcome:
    """Count ``amount`` hits for ``subject`` under limit ``name``; allowed while within ``rate``."""
    if rate.limit == 0:
        return Outcome(True, 0, 0)
    key = keys.rate_limit(name, subject)
    args = (rate.window * 1000, amount)
    try:
        count, ttl_ms = await redis.evalsha(_HIT_SHA, 1, key, *args)
    except NoScriptError:
        count, ttl_ms = await redis.eval(HIT_SCRIPT, 1, key, *args)
    return Outcome(int(count) <= rate.limit, int(count), max(1, math.ceil(int(ttl_ms) / 1000)))


async def enforce(redis: Redis, name: str, subject: str, rate: Rate) -> None:
    """Count one hit; raise 429 ``rate_limited`` with ``Retry-After`` when over the limit."""
    outcome = await hit(redis, name, subject, rate)
    if not outcome.allowed:
        raise limited(outcome)


Charge = tuple[str, Rate, int]  # limit name, its rate, how much to count


async def take_all(redis: Redis, subject: str, charges: list[Charge]) -> None:
    """Count every charge for ``subject``, all or none: over any limit, what was counted is
    given back and 429 is raised. A quota, not a throttle: see :func:`give_back`."""
    taken: list[Charge] = []
    for charge in charges:
        name, rate, amount = charge
        outcome = await hit(redis, name, subject, rate, amount)
        taken.append(charge)
        if not outcome.allowed:
            await give_back(redis, subject, taken)
            raise limited(outcome)


async def give_back(redis: Redis, subject: str, charges: list[Charge]) -> None:
    """Uncount what :func:`take_all` counted (the work it paid for did not happen)."""
    for name, rate, amount in charges:
        await hit(redis, name, subject, rate, -amount)


def limited(outcome: Outcome) -> ApiError:
    return ApiError(
        "rate_limited",
        f"Too many requests; try again in {outcome.retry_after} s.",
        {"retry_after": outcome.retry_after},
        headers={"Retry-After": str(outcome.retry_after)},
    )
