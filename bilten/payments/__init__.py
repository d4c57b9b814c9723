"""Payment providers: one interface, a built-in test provider and Stripe.

The booking saga charges, refunds and looks up payments through :class:`Provider`, always
keyed by the booking id, so every call can be repeated safely. :func:`provider_from_settings`
returns the configured provider wrapped in timeouts, retries and a circuit breaker.
"""

from __future__ import annotations

from redis.asyncio import Redis

from bilten.payments.base import Charge, PaymentDeclined, Provider, ProviderUnavailable
from bilten.payments.resilience import ResilientProvider
from bilten.payments.stripe import StripeProvider
from bilten.payments.testing import TestProvider
from bilten.payments.webhooks import InvalidSignature, sign_stripe_payload, verify_stripe_signature
from bilten.settings import Settings

__all__ = [
    "Charge",
    "InvalidSignature",
    "PaymentDeclined",
    "Provider",
    "ProviderUnavailable",
    "ResilientProvider",
    "StripeProvider",
    "TestProvider",
    "provider_from_settings",
    "sign_stripe_payload",
    "verify_stripe_signature",
]


def provider_from_settings(settings: Settings, redis: Redis) -> ResilientProvider:
    """The configured provider behind the resilience layer; ``await p.aclose()`` on shutdown."""
    inner: Provider
    if settings.payment_provider == "stripe":
        inner = StripeProvider(
            api_key=settings.stripe_api_key,
            base_url=settings.stripe_base_url,
            timeout=settings.payment_timeout,
        )
    elif settings.payment_provider == "test":
        inner = TestProvider(
            redis,
            latency_ms=settings.test_payment_latency_ms,
            p99_ms=settings.test_payment_latency_p99_ms,
            hang_share=settings.test_payment_hang_share,
        )
    else:
        raise ValueError(f"unknown payment provider {settings.payment_provider!r}")
    return ResilientProvider(
        inner, timeout=settings.payment_timeout, retries=settings.payment_retries
    )
