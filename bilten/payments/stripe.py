"""The Stripe provider: PaymentIntents and Refunds over Stripe's REST API.

Form-encoded requests on one shared ``httpx.AsyncClient``. Charges are made idempotent by
Stripe's ``Idempotency-Key`` header (the booking id), which Stripe honours for 24 hours: a repeat
within that time replays the first answer, a decline included. Refunds also look for an
existing refund first, so they stay idempotent after those 24 hours.

How Stripe's answers are read:

* 402, or an error of type ``card_error``: :class:`PaymentDeclined` with the decline code,
  ``processing_error`` included: it is about the card, so it never counts against the circuit
  breaker and is not retried for the buyer (who may try again with a new request);
* 409 (the same key is still being processed), 429 and 5xx: transient, unless Stripe says
  ``Stripe-Should-Retry: false``;
* 400 and 404 (an unknown payment method or payment): :class:`PaymentDeclined` with the error
  code, since sending the same request again cannot succeed;
* 401, 403 and anything else: :class:`ProviderUnavailable` (a configuration problem);
* a network error or timeout: transient.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import httpx
import msgspec

from bilten.payments.base import Charge, PaymentDeclined, ProviderUnavailable, Transient

log = logging.getLogger(__name__)

# Pinned so that answers keep their shape (``latest_charge``) whatever the account's default.
API_VERSION = "2024-06-20"
PAGE = 100

# Bilten's test token names, mapped to Stripe's test PaymentMethods. Other ``tok_`` tokens go to
# Stripe as card tokens, and ``pm_`` ids (what Stripe.js makes) are used as they are.
TEST_PAYMENT_METHODS = {
    "tok_visa": "pm_card_visa",
    "tok_chargeDeclined": "pm_card_visa_chargeDeclined",
    "tok_insufficientFunds": "pm_card_visa_chargeDeclinedInsufficientFunds",
    "tok_processingError": "pm_card_chargeDeclinedProcessingError",
}

_json = msgspec.json.Decoder()


class StripeProvider:
    name = "stripe"

    def __init__(self, *, api_key: str, base_url: str, timeout: float) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}", "Stripe-Version": API_VERSION},
            # The retry layer's deadline is the one that counts; this one only backs it up.
            timeout=timeout + 1.0,
        )
        self._search = True  # False once the server turned out to lack the Search API

    async def aclose(self) -> None:
        await self._http.aclose()

    async def charge(self, *, key: str, amount_cents: int, currency: str, token: str) -> Charge:
        form = {
            "amount": str(amount_cents),
            "currency": currency.lower(),
            "confirm": "true",
            # Cards only: other methods may need a redirect (a return_url) or settle later.
            "payment_method_types[]": "card",
            "metadata[booking_id]": key,
            **_payment_method(token),
        }
        intent = await self._request("POST", "/v1/payment_intents", data=form, idempotency_key=key)
        status = intent.get("status")
        if not isinstance(status, str):
            raise Transient("stripe answered a payment intent without a status")
        if status == "succeeded":
            return _charge(intent, refunded=False)
        if status == "requires_action":
            # 3-D Secure wants the card holder, who is not here: the booking cannot go on.
            raise PaymentDeclined("authentication_required", "the card needs authentication")
        if status == "processing":
            # Not an answer yet: it may still succeed. The booking's payment is then unknown,
            # and recovery looks it up (refunding it, should it succeed after all).
            raise ProviderUnavailable(f"payment intent {intent.get('id')} is still processing")
        raise PaymentDeclined(f"intent_{status}", f"payment intent {intent.get('id')} is {status}")

    async def refund(self, *, key: str, payment_id: str, amount_cents: int, round: int = 0) -> str:
        existing = await self._existing_refund(payment_id, key)
        if existing:
            return existing
        form = {
            "payment_intent": payment_id,
            "amount": str(amount_cents),
            "metadata[booking_id]": key,
        }
        try:
            idempotency_key = f"refund-{key}" + (f"-{round}" if round else "")
            refund = await self._request(
                "POST", "/v1/refunds", data=form, idempotency_key=idempotency_key
            )
        except PaymentDeclined as exc:
            # Another instance refunded it between our look and our request.
            if exc.decline_code == "charge_already_refunded":
                existing = await self._existing_refund(payment_id, key)
                if existing:
                    return existing
            raise
        if refund.get("status") in ("failed", "canceled"):
            raise PaymentDeclined("refund_failed", f"refund {refund.get('id')} failed at once")
        return str(refund["id"])

    async def lookup(self, *, key: str) -> Charge | None:
        """The succeeded (or since refunded) PaymentIntent made for ``key``; while one is still
        processing, no answer (``ProviderUnavailable``): asked again later.

        Uses the Search API. Stripe's search index trails writes by up to a minute, so right
        after a timeout ``charge`` again with the same key (a replay within 24 hours) is the
        surer way to learn an outcome. Servers without search (emulators, some regions) answer
        404; then every PaymentIntent is listed page by page, which the call's timeout bounds.
        """
        intents = await self._search_intents(key) if self._search else None
        if intents is None:
            intents = await self._list_intents(key)
        if any(i.get("status") == "processing" for i in intents):
            raise ProviderUnavailable(f"a payment intent for {key} is still processing")
        found = [i for i in intents if i.get("status") == "succeeded"]
        if len(found) > 1:
            log.warning("%d succeeded payment intents for booking %s", len(found), key)
        if not found:
            return None
        latest = found[0].get("latest_charge")
        return _charge(found[0], refunded=isinstance(latest, dict) and bool(latest.get("refunded")))

    async def _search_intents(self, key: str) -> list[dict[str, Any]] | None:
        quoted = key.replace("\\", "\\\\").replace("'", "\\'")
        params = {
            "query": f"metadata['booking_id']:'{quoted}'",
            "limit": str(PAGE),
            "expand[]": "data.latest_charge",
        }
        response = await self._send("GET", "/v1/payment_intents/search", params=params)
        if response.status_code == 404:
            log.info("%s has no payment intent search; listing instead", self._http.base_url)
            self._search = False
            return None
        return list(_checked(response).get("data") or [])

    async def _list_intents(self, key: str) -> list[dict[str, Any]]:
        params = {"limit": str(PAGE), "expand[]": "data.latest_charge"}
        matches: list[dict[str, Any]] = []
        while True:
            page = await self._request("GET", "/v1/payment_intents", params=params)
            data = page.get("data") or []
            matches += [i for i in data if (i.get("metadata") or {}).get("booking_id") == key]
            if not page.get("has_more") or not data:
                return matches
            params["starting_after"] = data[-1]["id"]

    async def _existing_refund(self, payment_id: str, key: str) -> str | None:
        """Our refund of the payment, made before (by a worker that died before it recorded
        it): one carrying the booking's id. A refund made otherwise (from the dashboard, for
        part of the amount, say) is not this one."""
        params = {"payment_intent": payment_id, "limit": str(PAGE)}
        page = await self._request("GET", "/v1/refunds", params=params)
        for refund in page.get("data") or []:
            ours = (refund.get("metadata") or {}).get("booking_id") == key
            if ours and refund.get("status") not in ("failed", "canceled"):
                return str(refund["id"])
        return None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        data: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        response = await self._send(
            method, path, data=data, params=params, idempotency_key=idempotency_key
        )
        return _checked(response)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        data: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        try:
            return await self._http.request(method, path, data=data, params=params, headers=headers)
        except httpx.TransportError as exc:  # refused, reset, timed out: the outcome is unknown
            raise Transient(f"stripe: {type(exc).__name__}: {exc}") from exc


def _payment_method(token: str) -> dict[str, str]:
    if token.startswith("pm_"):
        return {"payment_method": token}
    if token in TEST_PAYMENT_METHODS:
        return {"payment_method": TEST_PAYMENT_METHODS[token]}
    return {"payment_method_data[type]": "card", "payment_method_data[card][token]": token}


def _charge(intent: dict[str, Any], *, refunded: bool) -> Charge:
    return Charge(
        id=str(intent["id"]),
        amount_cents=int(intent["amount"]),
        currency=str(intent["currency"]).upper(),
        status="refunded" if refunded else "succeeded",
    )


def _checked(response: httpx.Response) -> dict[str, Any]:
    try:
        body = _json.decode(response.content)
    except msgspec.DecodeError:
        body = None  # a proxy's HTML error page, say
    if response.is_success:
        if not isinstance(body, dict):
            # The request may have taken effect: ask again (a replay) rather than guess.
            raise Transient(f"stripe answered {response.status_code} with an unreadable body")
        return body
    if not isinstance(body, dict):
        body = {}
    _raise_for(response, body)


def _raise_for(response: httpx.Response, body: dict[str, Any]) -> NoReturn:
    status = response.status_code
    error = body.get("error")
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or response.reason_phrase)
    code = str(error.get("decline_code") or error.get("code") or "")
    if status == 402 or error.get("type") == "card_error":
        raise PaymentDeclined(code or "card_declined", message)
    if status in (409, 429) or status >= 500:
        if response.headers.get("Stripe-Should-Retry") == "false":
            raise ProviderUnavailable(f"stripe answered {status}: {message}")
        raise Transient(f"stripe answered {status}: {message}")
    if status in (400, 404):
        raise PaymentDeclined(code or str(error.get("type") or "invalid_request"), message)
    raise ProviderUnavailable(f"stripe answered {status}: {message}")
