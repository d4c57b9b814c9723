"""Prometheus metrics of the process (the default registry also carries process metrics)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client import generate_latest as _generate_latest

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double the output and nobody reads them

CONTENT_TYPE = CONTENT_TYPE_LATEST

HTTP_REQUESTS = Counter(
    "bilten_http_requests_total",
    "HTTP requests answered, by method, route template and status.",
    ("method", "route", "status"),
)
HTTP_LATENCY = Histogram(
    "bilten_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ("method", "route"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
HTTP_IN_FLIGHT = Gauge("bilten_http_requests_in_flight", "HTTP requests being answered.")
WORKER_RESTARTS = Counter(
    "bilten_worker_restarts_total", "Background coroutines restarted after a crash.", ("worker",)
)


def generate_latest() -> bytes:
    return _generate_latest(REGISTRY)


MAIL_SENT = Counter(
    "bilten_mail_sent_total",
    "Mails accepted by the mail server (or written to the mail folder), by template.",
    ("template",),
)
MAIL_FAILED = Counter(
    "bilten_mail_failed_total",
    "Mail attempts that failed and will be retried, by template.",
    ("template",),
)
MAIL_DEAD = Counter(
    "bilten_mail_dead_total",
    "Mails given up on (refused for good, or out of attempts), by template.",
    ("template",),
)
PAYMENT_CALLS = Counter(
    "bilten_payment_calls_total",
    "Attempts at a payment provider call, by provider, operation and outcome "
    "(ok, declined, error, timeout, circuit_open).",
    ("provider", "operation", "outcome"),
)
PAYMENT_LATENCY = Histogram(
    "bilten_payment_call_duration_seconds",
    "Time of one attempt at a payment provider call, by provider and operation.",
    ("provider", "operation"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PAYMENT_CIRCUIT = Gauge(
    "bilten_payment_circuit_state",
    "Circuit breaker of each payment provider: 0 closed, 1 half-open (one trial call), 2 open.",
    ("provider",),
)

BOOKINGS = Counter(
    "bilten_bookings_total",
    "Bookings that ended, by outcome and failure code.",
    ("outcome", "code"),
)
SAGA_SECONDS = Histogram(
    "bilten_saga_duration_seconds",
    "From the first step of a booking saga to its end.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REFUNDS = Counter(
    "bilten_refunds_total",
    "Refunds by event: requested (decided and recorded), refunded (confirmed by the provider), "
    "retried (an attempt that failed and will be made again), dead (given up: see the refunds "
    "table's last_error; an operator must act).",
    ("outcome",),
)
REFUNDED_CENTS = Counter(
    "bilten_refunded_cents_total", "Money given back, confirmed by the provider, in cents."
)
REFUNDS_WAITING = Gauge(
    "bilten_refunds_waiting",
    "Refunds not confirmed yet, by state (pending: will be tried again; dead: given up).",
    ("state",),
)
QUEUE_DEPTH = Gauge("bilten_booking_queue_depth", "Booking requests waiting, seen on enqueue.")

CHECK_INS = Counter(
    "bilten_check_ins_total", "Tickets scanned at the door, by result.", ("result",)
)

WS_CONNECTIONS = Gauge(
    "bilten_ws_connections",
    "Open WebSocket connections, by kind (authenticated, anonymous).",
    ("kind",),
)
WS_ROOMS = Gauge("bilten_ws_rooms", "Seat-map rooms this instance is subscribed to.")
WS_MESSAGES_SENT = Counter("bilten_ws_messages_sent_total", "Messages written to WebSockets.")
WS_MESSAGES_RECEIVED = Counter(
    "bilten_ws_messages_received_total", "Messages received from WebSocket clients."
)
WS_CLOSED = Counter(
    "bilten_ws_closed_total",
    "WebSocket connections the server closed, by reason (slow: send queue full; idle).",
    ("reason",),
)
