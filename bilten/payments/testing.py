"""The built-in test provider: Stripe's test token names, no money, a ledger in Redis.

``tok_visa`` succeeds; ``tok_chargeDeclined`` is declined ``generic_decline``;
``tok_insufficientFunds`` is declined ``insufficient_funds``; ``tok_processingError`` is declined
``processing_error`` (a card error, as Stripe has it: the buyer's problem, never a fault of the
provider that would count against its circuit breaker); ``tok_hang`` never answers (each call
waits until the caller's timeout: what one charge in a real provider's tail does); any other
token is declined ``invalid_token``.

The ledger lives in Redis rather than in the process, so a charge survives a crash of the
instance that made it and any instance can look it up: that is what saga recovery needs. One
Lua script records the first outcome for a key and returns whatever is recorded, so concurrent
charges with one key, on any instances, agree on a single charge.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import secrets
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bilten import keys
from bilten.payments.base import Charge, PaymentDeclined, Transient
from bilten.pipelining import AutoPipeline

SUCCEEDS = "tok_visa"
HANGS = "tok_hang"
DECLINES = {
    "tok_chargeDeclined": "generic_decline",
    "tok_insufficientFunds": "insufficient_funds",
    "tok_processingError": "processing_error",
}
UNKNOWN_TOKEN = "invalid_token"
LEDGER_TTL = 90 * 24 * 3600  # long enough for any cancellation; it is test money after all

# KEYS[1] ledger entry; ARGV[1] ttl; ARGV[2..] field/value pairs to record if the key is new.
# Returns the entry as stored, so every caller sees the first outcome.
_CHARGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS[1] ledger entry; ARGV[1] payment id, ARGV[2] amount, ARGV[3] refund id if new, ARGV[4] ttl.
# Returns {'ok', refund id} (the earlier one for a repeat) or {'err', decline code}.
_REFUND = """
local e = redis.call('HMGET', KEYS[1], 'payment_id', 'status', 'amount_cents', 'refund_id')
if e[1] ~= ARGV[1] then return {'err', 'no_such_payment'} end
if e[2] == 'refunded' then return {'ok', e[4]} end
if tonumber(ARGV[2]) > tonumber(e[3]) then return {'err', 'amount_too_large'} end
redis.call('HSET', KEYS[1], 'status', 'refunded', 'refund_id', ARGV[3], 'refunded_cents', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'ok', ARGV[3]}
"""

_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_CHARGE, _REFUND)}


class TestProvider:
    __test__ = False  # not a pytest test class, whatever its name says
    name = "test"

    def __init__(
        self, redis: Redis, *, latency_ms: int = 0, p99_ms: int = 0, hang_share: float = 0.0
    ) -> None:
        self._redis = redis
        self._scripts = AutoPipeline(redis)  # a batch's charges go to Redis together
        self._latency = latency_ms / 1000
        # A log-normal spread: the median as given, the 99th percentile (2.326 deviations up)
        # at p99_ms: the long tail real providers have.
        self._spread = math.log(p99_ms / latency_ms) / 2.326 if p99_ms > latency_ms > 0 else 0.0
        self._hangs = hang_share

    async def charge(self, *, key: str, amount_cents: int, currency: str, token: str) -> Charge:
        await self._pause()
        if token == HANGS:
            await asyncio.sleep(3600)  # the caller's timeout ends it
        fields: dict[str, str | int] = {
            "amount_cents": amount_cents,
            "currency": currency.upper(),
            "created_at": int(time.time()),
        }
        if token == SUCCEEDS:
            fields |= {"status": "succeeded", "payment_id": f"tpay_{secrets.token_hex(12)}"}
        else:
            fields |= {"status": "declined", "decline_code": DECLINES.get(token, UNKNOWN_TOKEN)}
        pairs = [item for pair in fields.items() for item in pair]
        raw = await self._eval(_CHARGE, keys.test_payment(key), LEDGER_TTL, *pairs)
        entry = _decode(dict(zip(raw[::2], raw[1::2], strict=True)))
        if entry["amount_cents"] != str(amount_cents) or entry["currency"] != currency.upper():
            # Stripe refuses an idempotency key reused with other parameters; so do we.
            raise PaymentDeclined("idempotency_error", "the key was used for another charge")
        if entry["status"] == "declined":
            raise PaymentDeclined(entry["decline_code"])
        charge = _charge(entry)
        assert charge is not None
        return charge

    async def refund(self, *, key: str, payment_id: str, amount_cents: int, round: int = 0) -> str:
        # Its refunds never fail once made: there is never a second round to tell apart.
        await self._pause()
        refund_id = f"tref_{secrets.token_hex(12)}"
        args = (payment_id, amount_cents, refund_id, LEDGER_TTL)
        outcome, value = await self._eval(_REFUND, keys.test_payment(key), *args)
        if _text(outcome) == "err":
            raise PaymentDeclined(_text(value), f"cannot refund {payment_id}")
        return _text(value)

    async def lookup(self, *, key: str) -> Charge | None:
        await self._pause()
        try:
            raw = await self._redis.hgetall(keys.test_payment(key))
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise Transient(f"test provider: redis: {exc}") from exc
        return _charge(_decode(raw))

    async def aclose(self) -> None:
        pass  # the Redis client belongs to the caller

    def delay(self) -> float:
        """Seconds the next call takes; a hang is an hour (the caller's timeout ends it)."""
        if self._hangs and random.random() < self._hangs:
            return 3600.0
        return self._latency * math.exp(self._spread * random.gauss())

    async def _pause(self) -> None:
        if self._latency or self._hangs:
            await asyncio.sleep(self.delay())

    async def _eval(self, script: str, key: str, *args: str | int) -> Any:
        try:
            return await self._scripts.script(script, _SHA[script], [key], args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # The ledger is out of reach: the outcome is unknown, as with a network error.
            raise Transient(f"test provider: redis: {exc}") from exc


def _text(value: bytes | str) -> str:
    # Works with clients made with or without decode_responses.
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _charge(entry: dict[str, str]) -> Charge | None:
    status = entry.get("status")
    if status not in ("succeeded", "refunded"):
        return None  # nothing recorded, or a decline: no money was taken
    return Charge(
        id=entry["payment_id"],
        amount_cents=int(entry["amount_cents"]),
        currency=entry["currency"],
        status="succeeded" if status == "succeeded" else "refunded",
    )
