"""Timeouts, retries and a circuit breaker around a payment provider.

Every attempt runs under a timeout. Transient failures (network errors, timeouts, 5xx) are
retried with exponential backoff and jitter; a decline never is, since the same card gives the
same answer. Retrying a charge is safe because providers are idempotent by key.

The breaker counts consecutive failed attempts. At the threshold it opens: calls fail at once
with :class:`ProviderUnavailable` for the cooldown, sparing a struggling provider and the
callers' time. After the cooldown one trial call goes through (half-open) while the others wait
for its answer, up to one call's timeout: success closes the breaker and lets them through,
failure opens it for another cooldown and fails them. Declines (card errors included) are
answers, not failures: a buyer's card can never switch sales off.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bilten import metrics
from bilten.payments.base import Charge, PaymentDeclined, Provider, ProviderUnavailable, Transient

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED, HALF_OPEN, OPEN = 0, 1, 2  # also the values of the circuit-state gauge


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempt`` (0-based): doubling, capped, with "equal jitter"
    (half fixed, half random) so that many callers failing together do not retry together."""
    delay = min(cap, base * 2.0**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


class Breaker:
    def __init__(
        self,
        name: str,
        *,
        threshold: int = 5,
        cooldown: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        hold: float = 10.0,
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self.hold = hold  # how long calls wait for a half-open trial's answer
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial: asyncio.Event | None = None  # set when the trial under way has an answer
        metrics.PAYMENT_CIRCUIT.labels(name).set(CLOSED)

    @property
    def state(self) -> int:
        if self._opened_at is None:
            return CLOSED
        return HALF_OPEN if self._clock() - self._opened_at >= self.cooldown else OPEN

    async def allow(self) -> bool:
        """Closed: go. Open: fail at once. Half-open: the first caller is the trial; the others
        wait for its answer (up to :attr:`hold` seconds) and follow it."""
        while True:
            state = self.state
            if state == CLOSED:
                return True
            if state == OPEN:
                return False
            if self._trial is None:
                self._trial = asyncio.Event()
                metrics.PAYMENT_CIRCUIT.labels(self.name).set(HALF_OPEN)
                return True
            try:
                await asyncio.wait_for(self._trial.wait(), self.hold)
            except TimeoutError:
                return False

    def _trial_ended(self) -> None:
        if self._trial is not None:
            self._trial.set()
            self._trial = None

    def succeeded(self) -> None:
        if self._opened_at is not None:
            log.info("payment provider %s answers again: circuit closed", self.name)
        self._failures = 0
        self._opened_at = None
        self._trial_ended()
        metrics.PAYMENT_CIRCUIT.labels(self.name).set(CLOSED)

    def failed(self) -> None:
        self._failures += 1
        was_open = self._opened_at is not None
        self._trial_ended()
        if was_open or self._failures >= self.threshold:
            if not was_open:
                log.warning(
                    "payment provider %s failed %d times in a row: circuit open for %g s",
                    self.name,
                    self._failures,
                    self.cooldown,
                )
            self._opened_at = self._clock()
            metrics.PAYMENT_CIRCUIT.labels(self.name).set(OPEN)

    def abandoned(self) -> None:
        """An attempt ended without an answer (cancelled): let another call be the trial."""
        self._trial_ended()


class ResilientProvider:
    """A :class:`Provider` that wraps another with timeouts, retries and a circuit breaker."""

    def __init__(
        self,
        inner: Provider,
        *,
        timeout: float,
        retries: int,
        backoff: float = 0.05,
        backoff_max: float = 2.0,
        failure_threshold: int = 5,
        cooldown: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.breaker = Breaker(
            inner.name, threshold=failure_threshold, cooldown=cooldown, clock=clock, hold=timeout
        )

    async def charge(self, *, key: str, amount_cents: int, currency: str, token: str) -> Charge:
        return await self._call(
            "charge",
            lambda: self.inner.charge(
                key=key, amount_cents=amount_cents, currency=currency, token=token
            ),
        )

    async def refund(self, *, key: str, payment_id: str, amount_cents: int, round: int = 0) -> str:
        return await self._call(
            "refund",
            lambda: self.inner.refund(
                key=key, payment_id=payment_id, amount_cents=amount_cents, round=round
            ),
        )

    async def lookup(self, *, key: str) -> Charge | None:
        return await self._call("lookup", lambda: self.inner.lookup(key=key))

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()

    async def _call(self, operation: str, attempt: Callable[[], Awaitable[T]]) -> T:
        calls = metrics.PAYMENT_CALLS
        for number in range(self.retries + 1):
            if not await self.breaker.allow():
                calls.labels(self.name, operation, "circuit_open").inc()
                raise ProviderUnavailable(f"payment provider {self.name}: circuit open")
            started = time.perf_counter()
            answered = False
            try:
                async with asyncio.timeout(self.timeout):
                    result = await attempt()
                answered = True
                self.breaker.succeeded()
                calls.labels(self.name, operation, "ok").inc()
                return result
            except PaymentDeclined:
                answered = True
                self.breaker.succeeded()
                calls.labels(self.name, operation, "declined").inc()
                raise
            except TimeoutError as exc:
                answered = True
                self.breaker.failed()
                calls.labels(self.name, operation, "timeout").inc()
                failure: ProviderUnavailable = Transient(
                    f"payment provider {self.name}: {operation} timed out after {self.timeout:g} s"
                )
                failure.__cause__ = exc
            except Transient as exc:
                answered = True
                self.breaker.failed()
                calls.labels(self.name, operation, "error").inc()
                failure = exc
            except ProviderUnavailable:
                # Not worth another attempt (a rejected API key, say), but still a failure.
                answered = True
                self.breaker.failed()
                calls.labels(self.name, operation, "error").inc()
                raise
            except Exception as exc:
                # An answer we cannot read: callers handle only the two payment errors.
                answered = True
                self.breaker.failed()
                calls.labels(self.name, operation, "error").inc()
                log.exception("payment %s on %s failed unexpectedly", operation, self.name)
                raise ProviderUnavailable(f"payment provider {self.name}: {exc!r}") from exc
            finally:
                metrics.PAYMENT_LATENCY.labels(self.name, operation).observe(
                    time.perf_counter() - started
                )
                if not answered:
                    self.breaker.abandoned()
            log.info(
                "payment %s attempt %d/%d failed: %s",
                operation,
                number + 1,
                self.retries + 1,
                failure,
            )
            if number < self.retries and self.breaker.state == CLOSED:
                await asyncio.sleep(backoff_delay(number, self.backoff, self.backoff_max))
        raise ProviderUnavailable(str(failure)) from failure
