"""Prometheus metrics of the process (the default registry also carries process metrics)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double the output and nobody reads them

CONTENT_TYPE = CONTENT_TYPE_LATEST


class HttpFigures:
    """HTTP requests answered (by method, route template and status), their durations, and those
    being answered.

    Counted in plain dicts and made into Prometheus series only when scraped: prometheus_client's
    own metrics take a lock and a few calls per update, three updates a request, which a cached
    read (some 60 µs in all) notices. Updated only from the event loop.
    """

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

    def __init__(self) -> None:
        self.in_flight = 0
        self.answered: dict[tuple[str, str, int], int] = {}
        # Per method and route: a count per bucket (the last one +Inf), then the sum.
        self.durations: dict[tuple[str, str], list[float]] = {}

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.answered[key] = self.answered.get(key, 0) + 1
        series = self.durations.get((method, route))
        if series is None:
            series = self.durations[(method, route)] = [0.0] * (len(self.BUCKETS) + 2)
        series[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        series[-1] += seconds

    def describe(self) -> Iterator[Metric]:
        return self._families(False)

    def collect(self) -> Iterator[Metric]:
        return self._families(True)

    def _families(self, filled: bool) -> Iterator[Metric]:
        answered = CounterMetricFamily(
            "bilten_http_requests",
            "HTTP requests answered, by method, route template and status.",
            labels=("method", "route", "status"),
        )
        durations = HistogramMetricFamily(
            "bilten_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            labels=("method", "route"),
        )
        bounds = [*(repr(float(b)) for b in self.BUCKETS), "+Inf"]
        for (method, route, status), count in list(self.answered.items()) if filled else ():
            answered.add_metric((method, route, str(status)), count)
        for labels, series in list(self.durations.items()) if filled else ():
            cumulative = [float(c) for c in series[:-1]]
            for n in range(1, len(cumulative)):
                cumulative[n] += cumulative[n - 1]
            durations.add_metric(labels, list(zip(bounds, cumulative, strict=True)), series[-1])
        yield answered
        yield durations
        yield GaugeMetricFamily(
            "bilten_http_requests_in_flight",
            "HTTP requests being answered.",
            value=self.in_flight if filled else None,
        )


HTTP = HttpFigures()
REGISTRY.register(HTTP)
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
    "retried (an attempt that failed and will be made again), failed_later (confirmed, then "
    "reported failed by the provider: made again), dead (given up: see the refunds table's "
    "last_error; an operator must act).",
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
SEAT_MAP_BUILDS = Counter(
    "bilten_seat_map_builds_total",
    "Seat maps read from PostgreSQL and encoded (a version no cache had yet).",
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
