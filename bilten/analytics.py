"""Organizer analytics of one event, computed in SQL from confirmed bookings and tickets."""

from __future__ import annotations

from datetime import datetime

import msgspec

from bilten.db import Connection


class TierSales(msgspec.Struct, kw_only=True):
    tier: str
    kind: str  # "seated" or "general_admission"
    tickets: int
    revenue_cents: int


class MinuteSales(msgspec.Struct, kw_only=True):
    minute: datetime
    tickets: int


class Refunds(msgspec.Struct, kw_only=True):
    count: int  # confirmed by the provider
    amount_cents: int
    pending: int  # decided, not confirmed yet: retried until they are
    dead: int  # given up after every attempt: an operator must act


class EventStats(msgspec.Struct, kw_only=True):
    event_id: str
    tickets_sold: int
    revenue_cents: int
    currency: str
    by_tier: list[TierSales]
    checked_in: int
    sales_per_minute: list[MinuteSales]
    refunds: Refunds


_BY_TIER = """
SELECT coalesce(pt.name, tt.name) AS tier,
       CASE WHEN bi.seat_id IS NULL THEN 'general_admission' ELSE 'seated' END AS kind,
       count(*) AS tickets, sum(bi.price_cents) AS revenue_cents
FROM bookings b
JOIN booking_items bi ON bi.booking_id = b.id
LEFT JOIN event_seats es ON es.event_id = b.event_id AND es.seat_id = bi.seat_id
LEFT JOIN price_tiers pt ON pt.id = es.tier_id
LEFT JOIN ticket_types tt ON tt.id = bi.ticket_type_id
WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED'
GROUP BY 1, 2 ORDER BY 4 DESC, 1
"""

_PER_MINUTE = """
SELECT date_trunc('minute', (step ->> 'at')::timestamptz) AS minute, count(*) AS tickets
FROM bookings b
CROSS JOIN LATERAL jsonb_path_query_first(b.history, '$[*] ? (@.to == "CONFIRMED")') AS step
JOIN booking_items bi ON bi.booking_id = b.id
WHERE b.event_id = $1 AND b.saga_state = 'CONFIRMED'
GROUP BY 1 ORDER BY 1
"""


_REFUNDS = """
SELECT count(*) FILTER (WHERE r.status = 'refunded') AS count,
       coalesce(sum(r.amount_cents) FILTER (WHERE r.status = 'refunded'), 0) AS amount_cents,
       count(*) FILTER (WHERE r.status = 'pending') AS pending,
       count(*) FILTER (WHERE r.status = 'dead') AS dead
FROM refunds r JOIN bookings b ON b.id = r.booking_id
WHERE b.event_id = $1
"""


async def event_stats(conn: Connection, event_id: str, currency: str) -> EventStats:
    tiers = [TierSales(**dict(r)) for r in await conn.fetch(_BY_TIER, event_id)]
    minutes = [MinuteSales(**dict(r)) for r in await conn.fetch(_PER_MINUTE, event_id)]
    checked_in = await conn.fetchval(
        "SELECT count(*) FROM tickets WHERE event_id = $1 AND status = 'checked_in'", event_id
    )
    return EventStats(
        event_id=event_id,
        tickets_sold=sum(t.tickets for t in tiers),
        revenue_cents=sum(t.revenue_cents for t in tiers),
        currency=currency,
        by_tier=tiers,
        checked_in=checked_in,
        sales_per_minute=minutes,
        refunds=Refunds(**dict(await conn.fetchrow(_REFUNDS, event_id))),
    )
