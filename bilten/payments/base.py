"""What every payment provider offers, and the errors its callers handle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True)
class Charge:
    id: str  # the provider's payment id (a PaymentIntent id for Stripe)
    amount_cents: int
    currency: str  # upper case, as Bilten stores it
    status: Literal["succeeded", "refunded"]


class PaymentDeclined(Exception):
    """The provider refused for good: a declined card, an unknown token, a refused refund.

    Never retried, and not a failure of the provider (the circuit breaker ignores it).
    """

    def __init__(self, decline_code: str, message: str = "") -> None:
        super().__init__(f"{decline_code}: {message}" if message else decline_code)
        self.decline_code = decline_code
        self.message = message


class ProviderUnavailable(Exception):
    """The outcome is unknown or the provider cannot be used now: a network error, a timeout,
    a 5xx after the retries, a rejected API key, or the circuit is open."""


class Transient(ProviderUnavailable):
    """A failure worth another attempt (network error, 5xx, rate limit).

    A subclass of :class:`ProviderUnavailable` so that a provider used without the retry
    layer still raises only the two public errors.
    """


class Provider(Protocol):
    name: str  # "test" or "stripe"

    async def charge(self, *, key: str, amount_cents: int, currency: str, token: str) -> Charge:
        """Charge once per ``key``: a repeat returns the first outcome (or raises its decline)."""
        ...

    async def refund(self, *, key: str, payment_id: str, amount_cents: int, round: int = 0) -> str:
        """Refund once per ``key`` and ``round`` and return the refund id (the same one for a
        repeat). A new ``round`` is a new refund, made once an earlier one failed."""
        ...

    async def lookup(self, *, key: str) -> Charge | None:
        """The charge made with ``key``, or None when no money was taken with it."""
        ...
