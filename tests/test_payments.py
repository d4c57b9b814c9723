"""Payment providers against real peers: Redis for the test provider's ledger, localstripe (a
stateful Stripe emulator, run as a subprocess) for the Stripe provider, and a small Stripe
imitation on loopback for what localstripe cannot do: failures on demand, hanging, Stripe's
decline codes and idempotency keys."""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from bilten import keys
from bilten.payments import (
    Charge,
    InvalidSignature,
    PaymentDeclined,
    ProviderUnavailable,
    ResilientProvider,
    StripeProvider,
    TestProvider,
    provider_from_settings,
    sign_stripe_payload,
    verify_stripe_signature,
)
from bilten.payments.resilience import CLOSED, OPEN, backoff_delay
from bilten.settings import Settings
from tests.conftest import free_port

API_KEY = "sk_test_bilten"


def booking_id() -> str:
    return f"bk_{secrets.token_hex(8)}"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def resilient(inner: Any, **options: Any) -> ResilientProvider:
    options = {"timeout": 2.0, "retries": 2, "backoff": 0.001, **options}
    return ResilientProvider(inner, **options)


# --- the test provider -----------------------------------------------------------------------


async def test_visa_charges_once_and_is_recorded(redis):
    provider = TestProvider(redis)
    key = booking_id()
    charge = await provider.charge(key=key, amount_cents=2500, currency="eur", token="tok_visa")
    assert charge.status == "succeeded"
    assert (charge.amount_cents, charge.currency) == (2500, "EUR")
    again = await provider.charge(key=key, amount_cents=2500, currency="EUR", token="tok_visa")
    assert again == charge
    assert await provider.lookup(key=key) == charge
    other = await provider.charge(
        key=booking_id(), amount_cents=2500, currency="EUR", token="tok_visa"
    )
    assert other.id != charge.id


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("tok_chargeDeclined", "generic_decline"),
        ("tok_insufficientFunds", "insufficient_funds"),
        ("tok_made_up", "invalid_token"),
        ("", "invalid_token"),
    ],
)
async def test_declines_are_final(redis, token, code):
    provider = TestProvider(redis)
    key = booking_id()
    with pytest.raises(PaymentDeclined) as first:
        await provider.charge(key=key, amount_cents=100, currency="EUR", token=token)
    assert first.value.decline_code == code
    # The first outcome stands, even if the same key now comes with a good card.
    with pytest.raises(PaymentDeclined) as second:
        await provider.charge(key=key, amount_cents=100, currency="EUR", token="tok_visa")
    assert second.value.decline_code == code
    assert await provider.lookup(key=key) is None


async def test_processing_error_is_a_card_error_that_never_opens_the_breaker(redis):
    """A buyer's card failing to process is the buyer's problem: declined at once, never
    retried, never counted against the provider (twelve of them leave the breaker closed)."""
    provider = resilient(TestProvider(redis), retries=2)
    before = sample(
        "bilten_payment_calls_total", provider="test", operation="charge", outcome="error"
    )
    for _ in range(12):
        with pytest.raises(PaymentDeclined) as declined:
            await provider.charge(
                key=booking_id(), amount_cents=100, currency="EUR", token="tok_processingError"
            )
        assert declined.value.decline_code == "processing_error"
    after = sample(
        "bilten_payment_calls_total", provider="test", operation="charge", outcome="error"
    )
    assert after == before
    assert sample("bilten_payment_circuit_state", provider="test") == 0
    charge = await provider.charge(
        key=booking_id(), amount_cents=100, currency="EUR", token="tok_visa"
    )
    assert charge.status == "succeeded"


async def test_same_key_other_amount_is_refused(redis):
    provider = TestProvider(redis)
    key = booking_id()
    await provider.charge(key=key, amount_cents=100, currency="EUR", token="tok_visa")
    with pytest.raises(PaymentDeclined) as declined:
        await provider.charge(key=key, amount_cents=200, currency="EUR", token="tok_visa")
    assert declined.value.decline_code == "idempotency_error"


async def test_concurrent_charges_with_one_key_on_two_instances_make_one_charge(redis, redis_url):
    other = aioredis.Redis.from_url(redis_url)
    try:
        a, b = TestProvider(redis), TestProvider(other)
        key = booking_id()
        charges = await asyncio.gather(
            *(
                (a if i % 2 else b).charge(
                    key=key, amount_cents=900, currency="EUR", token="tok_visa"
                )
                for i in range(20)
            )
        )
    finally:
        await other.aclose()
    assert len({c.id for c in charges}) == 1
    assert [k async for k in redis.scan_iter(match=keys.test_payment("*"))] == [
        keys.test_payment(key).encode()
    ]


async def test_refund_is_idempotent_and_visible_to_lookup(redis, redis_url):
    provider = TestProvider(redis)
    key = booking_id()
    charge = await provider.charge(key=key, amount_cents=1200, currency="EUR", token="tok_visa")
    refund_id = await provider.refund(key=key, payment_id=charge.id, amount_cents=1200)
    assert refund_id.startswith("tref_")
    assert await provider.refund(key=key, payment_id=charge.id, amount_cents=1200) == refund_id
    other = aioredis.Redis.from_url(redis_url)
    try:
        found = await TestProvider(other).lookup(key=key)
    finally:
        await other.aclose()
    assert found == Charge(charge.id, 1200, "EUR", "refunded")


async def test_refund_of_something_never_charged_is_declined(redis):
    provider = TestProvider(redis)
    key = booking_id()
    with pytest.raises(PaymentDeclined) as nothing:
        await provider.refund(key=key, payment_id="tpay_nope", amount_cents=100)
    assert nothing.value.decline_code == "no_such_payment"
    charge = await provider.charge(key=key, amount_cents=100, currency="EUR", token="tok_visa")
    with pytest.raises(PaymentDeclined) as wrong:
        await provider.refund(key=key, payment_id="tpay_other", amount_cents=100)
    assert wrong.value.decline_code == "no_such_payment"
    with pytest.raises(PaymentDeclined) as too_much:
        await provider.refund(key=key, payment_id=charge.id, amount_cents=101)
    assert too_much.value.decline_code == "amount_too_large"


async def test_lookup_finds_a_charge_made_by_another_instance(redis, redis_url):
    key = booking_id()
    charge = await TestProvider(redis).charge(
        key=key, amount_cents=700, currency="EUR", token="tok_visa"
    )
    other = aioredis.Redis.from_url(redis_url)
    try:
        assert await TestProvider(other).lookup(key=key) == charge
        assert await TestProvider(other).lookup(key=booking_id()) is None
    finally:
        await other.aclose()


async def test_latency_option(redis, redis_url):
    provider = provider_from_settings(
        Settings(redis_url=redis_url, test_payment_latency_ms=60), redis
    )
    assert provider.name == "test"
    started = time.monotonic()
    await provider.charge(key=booking_id(), amount_cents=100, currency="EUR", token="tok_visa")
    assert time.monotonic() - started >= 0.06
    await provider.aclose()


# --- Stripe, against localstripe ---------------------------------------------------------------


@pytest.fixture(scope="module")
def localstripe(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("localstripe") / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "localstripe", "--port", str(port), "--from-scratch"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"localstripe did not start:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                headers = {"Authorization": f"Bearer {API_KEY}"}
                if httpx.get(f"{url}/v1/payment_intents", headers=headers).status_code == 200:
                    break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def stripe(localstripe, redis, redis_url) -> AsyncIterator[ResilientProvider]:
    settings = Settings(
        redis_url=redis_url,
        payment_provider="stripe",
        stripe_api_key=API_KEY,
        stripe_base_url=localstripe,
        payment_timeout=5.0,
        payment_retries=1,
    )
    provider = provider_from_settings(settings, redis)
    yield provider
    await provider.aclose()


async def test_localstripe_charge_lookup_and_refund(stripe):
    assert stripe.name == "stripe"
    key = booking_id()
    charge = await stripe.charge(key=key, amount_cents=4200, currency="EUR", token="tok_visa")
    assert charge.id.startswith("pi_")
    assert (charge.amount_cents, charge.currency, charge.status) == (4200, "EUR", "succeeded")
    # localstripe has no search endpoint: this goes through the listing fallback.
    assert await stripe.lookup(key=key) == charge
    assert await stripe.lookup(key=booking_id()) is None

    refund_id = await stripe.refund(key=key, payment_id=charge.id, amount_cents=4200)
    assert refund_id.startswith("re_")
    assert await stripe.refund(key=key, payment_id=charge.id, amount_cents=4200) == refund_id
    assert await stripe.lookup(key=key) == Charge(charge.id, 4200, "EUR", "refunded")


async def test_localstripe_decline(stripe):
    key = booking_id()
    # The one test card localstripe declines at charge time ("decline after attaching").
    with pytest.raises(PaymentDeclined) as declined:
        await stripe.charge(
            key=key, amount_cents=100, currency="EUR", token="pm_card_chargeCustomerFail"
        )
    assert declined.value.decline_code == "card_declined"
    assert await stripe.lookup(key=key) is None


async def test_localstripe_unknown_card_is_declined_not_retried(stripe):
    before = sample(
        "bilten_payment_calls_total", provider="stripe", operation="charge", outcome="declined"
    )
    with pytest.raises(PaymentDeclined):
        await stripe.charge(key=booking_id(), amount_cents=100, currency="EUR", token="pm_nope")
    after = sample(
        "bilten_payment_calls_total", provider="stripe", operation="charge", outcome="declined"
    )
    assert after - before == 1


async def test_localstripe_refund_of_unknown_payment_is_declined(stripe):
    with pytest.raises(PaymentDeclined):
        await stripe.refund(key=booking_id(), payment_id="pi_nope", amount_cents=100)


async def test_localstripe_bad_api_key_is_unavailable(localstripe):
    provider = resilient(StripeProvider(api_key="nope", base_url=localstripe, timeout=5))
    try:
        with pytest.raises(ProviderUnavailable, match="401"):
            await provider.charge(
                key=booking_id(), amount_cents=100, currency="EUR", token="tok_visa"
            )
    finally:
        await provider.aclose()


# --- Stripe, against a small imitation for what localstripe cannot produce ----------------------

# Stripe's own answers to its test payment methods (https://docs.stripe.com/testing).
_STRIPE_DECLINES = {
    "pm_card_visa_chargeDeclined": ("card_declined", "generic_decline"),
    "pm_card_visa_chargeDeclinedInsufficientFunds": ("card_declined", "insufficient_funds"),
    "pm_card_chargeDeclinedProcessingError": ("processing_error", None),
}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    form: dict[str, str]


class FakeStripe:
    """PaymentIntents as Stripe answers them, idempotency keys included, plus failures on
    demand: ``script`` answers the next requests with those statuses (``"hang"`` never
    answers; ``"late"`` does the work, then answers only after ``late_by`` seconds, past the
    client's timeout), ``always`` answers every request with one status, ``delay`` slows every
    answer, and ``search_lag`` keeps new intents out of search results for that long, as
    Stripe's search index lags behind."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.script: list[int | str] = []
        self.always: int | None = None
        self.delay = 0.0
        self.late_by = 5.0
        self.search_lag = 0.0
        self.processing = False  # new intents are "processing" (their outcome comes later)
        self.headers: dict[str, str] = {}
        self.intents: list[dict[str, Any]] = []
        self.refunds: list[dict[str, Any]] = []
        self._replays: dict[str, tuple[int, dict[str, Any]]] = {}
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> FakeStripe:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._stopped.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def charges(self) -> list[Seen]:
        return [r for r in self.requests if (r.method, r.path) == ("POST", "/v1/payment_intents")]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                url = urlsplit(target)
                seen = Seen(
                    method,
                    unquote(url.path),
                    dict(parse_qsl(url.query)),
                    headers,
                    dict(parse_qsl(body.decode())),
                )
                self.requests.append(seen)
                planned = self.script.pop(0) if self.script else self.always
                if planned == "hang":
                    await self._stopped.wait()
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                if planned == "late":
                    status, payload = self._answer(seen)
                    await asyncio.sleep(self.late_by)
                elif isinstance(planned, int):
                    status, payload = planned, {"error": {"type": "api_error", "message": "boom"}}
                else:
                    status, payload = self._answer(seen)
                data = json.dumps(payload).encode()
                extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
                writer.write(
                    f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                    f"{extra}\r\n".encode()
                    + data
                )
                await writer.drain()
        finally:
            writer.close()
            self._tasks.discard(task)

    def _answer(self, seen: Seen) -> tuple[int, dict[str, Any]]:
        if seen.headers.get("authorization") != f"Bearer {API_KEY}":
            return 401, {"error": {"type": "invalid_request_error", "message": "bad key"}}
        if (seen.method, seen.path) == ("GET", "/v1/payment_intents/search"):
            booking = seen.query["query"].split(":", 1)[1].strip("'")
            indexed = time.monotonic() - self.search_lag
            found = [
                i
                for i in self.intents
                if i["metadata"]["booking_id"] == booking and i["_made"] <= indexed
            ]
            found = [{k: v for k, v in i.items() if k != "_made"} for i in found]
            return 200, {"object": "search_result", "data": found, "has_more": False}
        if (seen.method, seen.path) == ("GET", "/v1/refunds"):
            mine = [r for r in self.refunds if r["payment_intent"] == seen.query["payment_intent"]]
            return 200, {"object": "list", "data": mine, "has_more": False}
        if (seen.method, seen.path) == ("POST", "/v1/refunds"):
            return self._refund(seen)
        if (seen.method, seen.path) != ("POST", "/v1/payment_intents"):
            return 404, {"error": {"type": "invalid_request_error", "message": "no such route"}}
        key = seen.headers.get("idempotency-key")
        if key and key in self._replays:
            return self._replays[key]
        answer = self._create_intent(seen.form)
        if key:
            self._replays[key] = answer
        return answer

    def _refund(self, seen: Seen) -> tuple[int, dict[str, Any]]:
        key = seen.headers.get("idempotency-key")
        if key and key in self._replays:
            return self._replays[key]
        intent = next((i for i in self.intents if i["id"] == seen.form["payment_intent"]), None)
        if intent is None or intent["status"] != "succeeded":
            return 400, {"error": {"type": "invalid_request_error", "code": "resource_missing"}}
        if intent["latest_charge"]["refunded"]:
            return 400, {
                "error": {"type": "invalid_request_error", "code": "charge_already_refunded"}
            }
        intent["latest_charge"]["refunded"] = True
        refund = {
            "id": f"re_{secrets.token_hex(8)}",
            "object": "refund",
            "payment_intent": intent["id"],
            "amount": int(seen.form.get("amount", intent["amount"])),
            "status": "succeeded",
            "metadata": {"booking_id": seen.form.get("metadata[booking_id]", "")},
        }
        self.refunds.append(refund)
        if key:
            self._replays[key] = (200, refund)
        return 200, refund

    def _create_intent(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        intent = {
            "id": f"pi_{secrets.token_hex(8)}",
            "object": "payment_intent",
            "amount": int(form["amount"]),
            "currency": form["currency"],
            "metadata": {"booking_id": form["metadata[booking_id]"]},
            "status": "succeeded",
            "latest_charge": {"id": f"ch_{secrets.token_hex(8)}", "refunded": False},
            "_made": time.monotonic(),
        }
        method = form.get("payment_method", "")
        if self.processing:
            intent["status"] = "processing"
        if method == "pm_card_authenticationRequired":
            intent["status"] = "requires_action"
        if method in _STRIPE_DECLINES:
            code, decline_code = _STRIPE_DECLINES[method]
            intent["status"] = "requires_payment_method"
            self.intents.append(intent)
            error = {"type": "card_error", "code": code, "message": "declined"}
            if decline_code:
                error["decline_code"] = decline_code
            return 402, {"error": {**error, "payment_intent": intent}}
        self.intents.append(intent)
        return 200, intent


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    async with FakeStripe() as server:
        yield server


@pytest.fixture
async def make_stripe() -> AsyncIterator[Callable[..., ResilientProvider]]:
    made: list[ResilientProvider] = []

    def make(url: str, *, timeout: float = 2.0, **options: Any) -> ResilientProvider:
        inner = StripeProvider(api_key=API_KEY, base_url=url, timeout=timeout)
        made.append(resilient(inner, timeout=timeout, **options))
        return made[-1]

    yield make
    for provider in made:
        await provider.aclose()


async def test_charge_request_is_what_stripe_expects(fake, make_stripe):
    provider = make_stripe(fake.url)
    key = booking_id()
    charge = await provider.charge(key=key, amount_cents=1500, currency="EUR", token="tok_visa")
    again = await provider.charge(key=key, amount_cents=1500, currency="EUR", token="tok_visa")
    assert again == charge
    assert len(fake.intents) == 1  # the repeat was a replay of the first answer
    first = fake.charges()[0]
    assert first.headers["idempotency-key"] == key
    assert first.headers["stripe-version"]
    assert first.headers["content-type"] == "application/x-www-form-urlencoded"
    assert first.form == {
        "amount": "1500",
        "currency": "eur",
        "confirm": "true",
        "payment_method_types[]": "card",
        "metadata[booking_id]": key,
        "payment_method": "pm_card_visa",
    }
    # A search-capable server is searched, not listed.
    assert await provider.lookup(key=key) == charge
    assert fake.requests[-1].query["query"] == f"metadata['booking_id']:'{key}'"


async def test_a_processing_intent_is_no_answer_yet_not_a_decline(fake, make_stripe):
    """A decline would close the booking's payment for good; an intent still processing may
    succeed later, so it is an unknown outcome (recovery looks it up until it is known)."""
    provider = make_stripe(fake.url, retries=0)
    key = booking_id()
    fake.processing = True
    with pytest.raises(ProviderUnavailable, match="processing") as raised:
        await provider.charge(key=key, amount_cents=1500, currency="EUR", token="tok_visa")
    assert not isinstance(raised.value, PaymentDeclined)
    with pytest.raises(ProviderUnavailable, match="processing"):
        await provider.lookup(key=key)
    fake.intents[0]["status"] = "succeeded"  # it went through after all
    found = await provider.lookup(key=key)
    assert found is not None and found.status == "succeeded" and found.amount_cents == 1500


async def test_a_card_token_goes_to_stripe_as_a_card_token(fake, make_stripe):
    provider = make_stripe(fake.url)
    await provider.charge(
        key=booking_id(), amount_cents=100, currency="EUR", token="tok_mastercard"
    )
    form = fake.charges()[0].form
    assert form["payment_method_data[type]"] == "card"
    assert form["payment_method_data[card][token]"] == "tok_mastercard"


@pytest.mark.parametrize(
    ("token", "code"),
    [("tok_chargeDeclined", "generic_decline"), ("tok_insufficientFunds", "insufficient_funds")],
)
async def test_stripe_decline_is_called_once_and_replayed(fake, make_stripe, token, code):
    provider = make_stripe(fake.url, retries=3)
    key = booking_id()
    for _ in range(2):
        with pytest.raises(PaymentDeclined) as declined:
            await provider.charge(key=key, amount_cents=100, currency="EUR", token=token)
        assert declined.value.decline_code == code
    assert len(fake.charges()) == 2  # once per call: never retried
    assert len(fake.intents) == 1
    assert await provider.lookup(key=key) is None


async def test_stripe_authentication_required_is_a_decline(fake, make_stripe):
    provider = make_stripe(fake.url)
    with pytest.raises(PaymentDeclined) as declined:
        await provider.charge(
            key=booking_id(),
            amount_cents=100,
            currency="EUR",
            token="pm_card_authenticationRequired",
        )
    assert declined.value.decline_code == "authentication_required"


async def test_stripe_processing_error_is_a_decline_not_retried(fake, make_stripe):
    provider = make_stripe(fake.url, retries=2)
    with pytest.raises(PaymentDeclined) as declined:
        await provider.charge(
            key=booking_id(), amount_cents=100, currency="EUR", token="tok_processingError"
        )
    assert declined.value.decline_code == "processing_error"
    assert len(fake.charges()) == 1


async def test_two_500s_then_success_charge_once(fake, make_stripe):
    provider = make_stripe(fake.url, retries=2)
    fake.script = [500, 502]
    key = booking_id()
    charge = await provider.charge(key=key, amount_cents=100, currency="EUR", token="tok_visa")
    assert charge.status == "succeeded"
    assert len(fake.charges()) == 3
    assert {r.headers["idempotency-key"] for r in fake.charges()} == {key}
    assert len(fake.intents) == 1


async def test_always_500_gives_up_after_the_retries(fake, make_stripe):
    provider = make_stripe(fake.url, retries=2)
    fake.always = 500
    with pytest.raises(ProviderUnavailable) as failed:
        await provider.charge(key=booking_id(), amount_cents=100, currency="EUR", token="tok_visa")
    assert "500" in str(failed.value)
    assert len(fake.requests) == 3


async def test_stripe_should_retry_false_is_not_retried(fake, make_stripe):
    provider = make_stripe(fake.url, retries=2)
    fake.always = 500
    fake.headers = {"Stripe-Should-Retry": "false"}
    with pytest.raises(ProviderUnavailable):
        await provider.charge(key=booking_id(), amount_cents=100, currency="EUR", token="tok_visa")
    assert len(fake.requests) == 1


async def test_rate_limit_is_retried(fake, make_stripe):
    provider = make_stripe(fake.url, retries=1)
    fake.script = [429]
    await provider.charge(key=booking_id(), amount_cents=100, currency="EUR", token="tok_visa")
    assert len(fake.requests) == 2


async def test_unreadable_answer_is_unavailable_not_a_decline(fake, make_stripe):
    provider = make_stripe(fake.url, retries=1)
    fake.always = 200  # a JSON body, but no payment intent in it
    with pytest.raises(ProviderUnavailable, match="without a status"):
        await provider.charge(key=booking_id(), amount_cents=100, currency="EUR", token="tok_visa")
    assert len(fake.requests) == 2


async def test_no_answer_times_out(fake, make_stripe):
    provider = make_stripe(fake.url, timeout=0.2, retries=1)
    fake.always = "hang"
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="timed out"):
        await provider.charge(key=booking_id(), amount_cents=100, currency="EUR", token="tok_visa")
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.0
    assert len(fake.requests) == 2


async def test_connection_refused_is_unavailable(make_stripe):
    provider = make_stripe(f"http://127.0.0.1:{free_port()}", retries=2)
    with pytest.raises(ProviderUnavailable, match="ConnectError"):
        await provider.lookup(key=booking_id())


async def test_backoff_grows_with_jitter_and_a_cap():
    for attempt in range(6):
        delay = backoff_delay(attempt, 0.05, 1.0)
        full = min(1.0, 0.05 * 2**attempt)
        assert full / 2 <= delay <= full


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def circuit() -> float:
    return sample("bilten_payment_circuit_state", provider="stripe")


async def test_breaker_opens_fails_fast_and_closes_after_a_good_trial(fake, make_stripe):
    clock = Clock()
    provider = make_stripe(fake.url, retries=0, failure_threshold=3, cooldown=10, clock=clock)
    fake.always = 500
    for _ in range(3):
        with pytest.raises(ProviderUnavailable, match="500"):
            await provider.charge(
                key=booking_id(), amount_cents=1, currency="EUR", token="tok_visa"
            )
    assert len(fake.requests) == 3
    assert circuit() == OPEN

    started = time.monotonic()
    for _ in range(5):
        with pytest.raises(ProviderUnavailable, match="circuit open"):
            await provider.lookup(key=booking_id())
    assert time.monotonic() - started < 0.1
    assert len(fake.requests) == 3  # the provider was left alone

    clock.now += 10
    fake.always = None
    await provider.charge(key=booking_id(), amount_cents=1, currency="EUR", token="tok_visa")
    assert circuit() == CLOSED
    await provider.charge(key=booking_id(), amount_cents=1, currency="EUR", token="tok_visa")
    assert len(fake.requests) == 5


async def test_breaker_failed_trial_opens_again(fake, make_stripe):
    clock = Clock()
    provider = make_stripe(fake.url, retries=3, failure_threshold=2, cooldown=5, clock=clock)
    fake.always = 503
    with pytest.raises(ProviderUnavailable, match="circuit open"):
        # The retries stop as soon as the breaker opens.
        await provider.charge(key=booking_id(), amount_cents=1, currency="EUR", token="tok_visa")
    assert len(fake.requests) == 2

    clock.now += 5
    with pytest.raises(ProviderUnavailable):
        await provider.charge(key=booking_id(), amount_cents=1, currency="EUR", token="tok_visa")
    assert len(fake.requests) == 3  # one trial, then open again
    assert circuit() == OPEN
    clock.now += 4
    with pytest.raises(ProviderUnavailable, match="circuit open"):
        await provider.lookup(key=booking_id())
    assert len(fake.requests) == 3


async def test_breaker_half_open_holds_the_others_for_the_trial(fake, make_stripe):
    """After the cooldown one trial goes to the provider while the others wait for it: a good
    answer lets them through (a half-open breaker must not fail a batch's other charges)."""
    clock = Clock()
    provider = make_stripe(fake.url, retries=0, failure_threshold=1, cooldown=1, clock=clock)
    fake.script = [500]
    with pytest.raises(ProviderUnavailable):
        await provider.lookup(key=booking_id())
    clock.now += 1
    fake.delay = 0.05
    seen = len(fake.requests)
    results = await asyncio.gather(
        *(provider.lookup(key=booking_id()) for _ in range(4)), return_exceptions=True
    )
    assert results == [None] * 4
    assert len(fake.requests) == seen + 4
    assert circuit() == CLOSED


async def test_breaker_failed_trial_fails_the_ones_it_held(fake, make_stripe):
    clock = Clock()
    provider = make_stripe(fake.url, retries=0, failure_threshold=1, cooldown=1, clock=clock)
    fake.script = [500]
    with pytest.raises(ProviderUnavailable):
        await provider.lookup(key=booking_id())
    clock.now += 1
    fake.delay = 0.05
    fake.script = [503]
    seen = len(fake.requests)
    results = await asyncio.gather(
        *(provider.lookup(key=booking_id()) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, ProviderUnavailable) for r in results)
    assert len(fake.requests) == seen + 1  # the trial alone reached the provider
    assert circuit() == OPEN


async def test_declines_do_not_open_the_breaker(fake, make_stripe):
    provider = make_stripe(fake.url, retries=0, failure_threshold=2)
    for _ in range(4):
        with pytest.raises(PaymentDeclined):
            await provider.charge(
                key=booking_id(), amount_cents=1, currency="EUR", token="tok_chargeDeclined"
            )
    assert circuit() == CLOSED
    await provider.charge(key=booking_id(), amount_cents=1, currency="EUR", token="tok_visa")


# --- webhook signatures -----------------------------------------------------------------------

SECRET = "whsec_test_secret"
EVENT = b'{"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": {}}}'
NOW = 1_750_000_000


def test_valid_signature_returns_the_event():
    header = sign_stripe_payload(EVENT, SECRET, NOW)
    event = verify_stripe_signature(EVENT, header, SECRET, now=NOW + 10)
    assert event["type"] == "payment_intent.succeeded"


def test_signature_over_the_real_clock():
    header = sign_stripe_payload(EVENT, SECRET, int(time.time()))
    assert verify_stripe_signature(EVENT, header, SECRET)["id"] == "evt_1"


def test_tampered_payload_is_rejected():
    header = sign_stripe_payload(EVENT, SECRET, NOW)
    with pytest.raises(InvalidSignature, match="no matching signature"):
        verify_stripe_signature(EVENT.replace(b"evt_1", b"evt_2"), header, SECRET, now=NOW)


def test_wrong_secret_is_rejected():
    header = sign_stripe_payload(EVENT, "whsec_other", NOW)
    with pytest.raises(InvalidSignature, match="no matching signature"):
        verify_stripe_signature(EVENT, header, SECRET, now=NOW)


def test_changed_timestamp_is_rejected():
    header = sign_stripe_payload(EVENT, SECRET, NOW).replace(f"t={NOW}", f"t={NOW + 1}")
    with pytest.raises(InvalidSignature, match="no matching signature"):
        verify_stripe_signature(EVENT, header, SECRET, now=NOW)


@pytest.mark.parametrize("skew", [301, -301, 3600])
def test_stale_or_future_timestamp_is_rejected(skew):
    header = sign_stripe_payload(EVENT, SECRET, NOW)
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify_stripe_signature(EVENT, header, SECRET, now=NOW + skew)
    assert verify_stripe_signature(EVENT, header, SECRET, now=NOW + skew, tolerance=abs(skew))


@pytest.mark.parametrize(
    "header",
    [None, "", "garbage", "t=abc,v1=00", f"t={NOW}", "v1=00", f"t={NOW},v0=00", "t=²,v1=00"],
)
def test_missing_or_malformed_header_is_rejected(header):
    with pytest.raises(InvalidSignature):
        verify_stripe_signature(EVENT, header, SECRET, now=NOW)


def test_one_matching_v1_among_several_is_enough():
    good = sign_stripe_payload(EVENT, SECRET, NOW).split("v1=")[1]
    header = f"t={NOW},v1={'0' * 64},v0=ignored,v1={good},v1=zz"
    assert verify_stripe_signature(EVENT, header, SECRET, now=NOW)["id"] == "evt_1"


def test_signed_payload_that_is_not_a_json_object_is_rejected():
    for payload in (b"not json", b"[1, 2]"):
        header = sign_stripe_payload(payload, SECRET, NOW)
        with pytest.raises(InvalidSignature, match="JSON"):
            verify_stripe_signature(payload, header, SECRET, now=NOW)


def test_empty_secret_never_verifies():
    header = sign_stripe_payload(EVENT, "", NOW)
    with pytest.raises(InvalidSignature):
        verify_stripe_signature(EVENT, header, "", now=NOW)


def test_the_test_providers_latency_can_have_a_realistic_tail(redis):
    from bilten.settings import SettingsError, from_env

    settings = from_env({"BILTEN_TEST_PAYMENT_LATENCY_MS": "150,2000,0.001"})
    assert (
        settings.test_payment_latency_ms,
        settings.test_payment_latency_p99_ms,
        settings.test_payment_hang_share,
    ) == (150, 2000, 0.001)
    for bad in ("fast", "150,100", "150,2000,2", "1,2,0.1,4"):
        with pytest.raises(SettingsError):
            from_env({"BILTEN_TEST_PAYMENT_LATENCY_MS": bad})
    provider = TestProvider(redis, latency_ms=150, p99_ms=2000, hang_share=0.001)
    delays = sorted(provider.delay() for _ in range(50_000))
    hangs = sum(d >= 3600 for d in delays)
    assert 20 <= hangs <= 90  # about 50 in 50,000
    served = [d for d in delays if d < 3600]
    assert 0.14 <= served[len(served) // 2] <= 0.16  # the median
    assert 1.7 <= served[int(len(served) * 0.99)] <= 2.3  # the 99th percentile
    assert TestProvider(redis, latency_ms=60).delay() == pytest.approx(0.06)


async def test_a_refund_made_outside_is_not_taken_for_ours(fake, make_stripe):
    """A refund of part of the payment made from Stripe's dashboard is not the booking's
    refund: the booking's own is still asked for (and Stripe judges the amount)."""
    provider = make_stripe(fake.url)
    key = booking_id()
    charge = await provider.charge(key=key, amount_cents=4500, currency="EUR", token="tok_visa")
    outside = {"id": "re_dashboard", "object": "refund", "payment_intent": charge.id}
    fake.refunds.append({**outside, "amount": 1000, "status": "succeeded", "metadata": {}})
    refund_id = await provider.refund(key=key, payment_id=charge.id, amount_cents=4500)
    assert refund_id != "re_dashboard"
    assert [r["amount"] for r in fake.refunds] == [1000, 4500]
    # Ours, asked for again (a worker that died before recording it): found, not made twice.
    assert await provider.refund(key=key, payment_id=charge.id, amount_cents=4500) == refund_id
    assert len(fake.refunds) == 2
