"""The saga's last step: PAYMENT_PENDING → CONFIRMED, or FAILED with the seats released.

Paid bookings are confirmed together (seats sold, units counted, tickets issued, notices
queued); refused ones are released together. A payment that outlived its seats is refunded as
durable intent: recorded in the transaction, made after it commits (no provider call runs
inside one), and retried by the refund worker should that fail.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from typing import Any

from bilten import holds, metrics, notifications, outbox, payments, refunds, ticketcodes
from bilten.bookings import Booking, BookingItem, Payment, TicketRef
from bilten.db import Connection
from bilten.errors import ApiError
from bilten.sagas.steps import (
    MANY_LOCKED,
    Outcome,
    PaymentResult,
    fail_many,
    lock_types,
    outcome_of,
    result_message,
)
from bilten.state import State

log = logging.getLogger(__name__)

HOLD_EXPIRED = "The hold ran out before the booking."
EVENT_OFF_SALE = "The event was cancelled while the payment was made; the payment is refunded."


def _payment_error(result: payments.PaymentDeclined | payments.ProviderUnavailable) -> ApiError:
    if isinstance(result, payments.PaymentDeclined):
        return ApiError(
            "payment_declined", "The card was declined.", {"decline_code": result.decline_code}
        )
    return ApiError(
        "unavailable",
        "The payment provider is unavailable; nothing was charged.",
        headers={"Retry-After": "5"},
    )


def _matches(row: Any, charge: payments.Charge) -> bool:
    """A charge confirms a booking only if it took the booking's amount in its currency."""
    return (
        charge.status == "succeeded"
        and charge.amount_cents == row["total_cents"]
        and charge.currency.upper() == row["currency"].upper()
    )


async def finish(app: State, results: dict[str, PaymentResult]) -> dict[str, Outcome]:
    """:func:`finish_committed`, then the refunds it asked for (committed first: no provider
    call runs inside a transaction)."""
    finished = await finish_committed(app, results)
    refund = [b for b, (_, wanted) in finished.items() if wanted]
    if refund:
        await refunds.run(app, refund)
    return {b: outcome for b, (outcome, _) in finished.items()}


async def finish_committed(
    app: State, results: dict[str, PaymentResult]
) -> dict[str, tuple[Outcome, bool]]:
    """PAYMENT_PENDING → CONFIRMED for the paid (seats sold, units counted, tickets issued), or
    FAILED with their seats released: declined; provider unavailable (the payment is marked
    unsettled: a sweeper looks it up and refunds anything taken); a charge that is not the
    booking's amount in its currency; paid after its seats were gone (the payment outlived its
    window). What was taken without a booking to show for it is refunded as durable intent
    (:mod:`bilten.refunds`), carried out once this transaction has committed. Bookings no longer
    PAYMENT_PENDING keep their state and are reported as they are; a charge that comes for one
    that failed or was cancelled meanwhile is refunded. Returns each booking's outcome, and
    whether a refund of it was recorded, for the caller to carry out (:func:`refunds.run`)."""
    outcomes: dict[str, Outcome] = {}
    async with app.db.acquire() as conn, conn.transaction():
        locked = await conn.fetch(MANY_LOCKED, list(results))
        rows = [r for r in locked if r["saga_state"] == "PAYMENT_PENDING"]
        ended = [r for r in locked if r["saga_state"] != "PAYMENT_PENDING"]
        for row in ended:
            outcomes[row["id"]] = outcome_of(row)
        charges = {b: r for b, r in results.items() if isinstance(r, payments.Charge)}
        paid = [r for r in rows if r["id"] in charges and _matches(r, charges[r["id"]])]
        wrong = [r for r in rows if r["id"] in charges and not _matches(r, charges[r["id"]])]
        refused = [r for r in rows if r["id"] not in charges]
        # The one lock order (docs/bookings.md): bookings, events, holds, ticket types, seats.
        # Events: those of the paid bookings, shared, so that a cancel committing meanwhile
        # waits for this transaction; one cancelled since its bookings were reserved sells
        # nothing more (its paid bookings fail, their charges refunded).
        off_sale: set[str] = set()
        if paid:
            events = await conn.fetch(
                """SELECT id::text, status FROM events WHERE id = ANY ($1::uuid[])
                   ORDER BY id FOR SHARE""",
                list({r["event_id"] for r in paid}),
            )
            off_sale = {e["id"] for e in events if e["status"] == "cancelled"}
        called_off = [r for r in paid if r["event_id"] in off_sale]
        paid = [r for r in paid if r["event_id"] not in off_sale]
        # Holds:
        # those the bookings took over. Seats: those of these holds, and those sold to the
        # bookings that fail (a booking that holds its own is paid for them: nothing to check).
        taken_over = [r["hold_id"] for r in rows if r["hold_id"]]
        hold_rows = []
        if taken_over:
            hold_rows = await conn.fetch(
                """SELECT id::text, event_id::text, ticket_type_id::text, quantity, status,
                          seat_ids::text[]
                   FROM holds WHERE id = ANY ($1::uuid[]) ORDER BY id FOR UPDATE""",
                taken_over,
            )
        await lock_types(
            conn,
            [h["ticket_type_id"] for h in hold_rows if h["ticket_type_id"]]
            + [t for r in rows if not r["hold_id"] for t, _ in _own_units(r)],
        )
        failing = [r for r in refused + wrong + called_off if not r["hold_id"]]
        keys = {(h["event_id"], s) for h in hold_rows for s in h["seat_ids"]}
        keys |= {(r["event_id"], s) for r in failing for s in _own_seats(r)}
        seats = []
        if keys:
            seats = await conn.fetch(
                """SELECT es.hold_id::text, es.status FROM event_seats es
                   JOIN unnest($1::uuid[], $2::uuid[]) AS k(event_id, seat_id)
                     ON es.event_id = k.event_id AND es.seat_id = k.seat_id
                   WHERE es.event_id = ANY ($1::uuid[]) AND es.seat_id = ANY ($2::uuid[])
                   ORDER BY es.seat_id FOR UPDATE OF es""",
                [e for e, _ in keys],
                [s for _, s in keys],
            )
        # Each live hold, and how many of its seats it still holds (locked above).
        live = {h["id"]: h for h in hold_rows if h["status"] == "active"}
        seats_of: dict[str, int] = defaultdict(int)
        for seat in seats:
            if seat["status"] == "held":
                seats_of[seat["hold_id"]] += 1
        confirmed, lost_ids = await _confirm_many(app, conn, paid, results, live, seats_of)
        lost = [r for r in paid if r["id"] in set(lost_ids)]
        gone = refused + lost + wrong + called_off
        await holds.release_many(conn, [r["hold_id"] for r in gone if r["hold_id"]])
        await _release_own(conn, failing)
        declined = [
            (r, _payment_error(results[r["id"]]))  # type: ignore[arg-type]
            for r in refused
            if isinstance(results[r["id"]], payments.PaymentDeclined)
        ]
        declined += [(r, _mismatch(r, charges[r["id"]])) for r in wrong]
        unknown = [
            (r, _payment_error(results[r["id"]]))  # type: ignore[arg-type]
            for r in refused
            if isinstance(results[r["id"]], payments.ProviderUnavailable)
        ]
        declined += [(r, ApiError("hold_expired", HOLD_EXPIRED)) for r in lost]
        declined += [(r, ApiError("conflict", EVENT_OFF_SALE)) for r in called_off]
        for outcome in (
            *confirmed,
            *await fail_many(conn, declined),
            *await fail_many(conn, unknown, unsettled=True),
        ):
            outcomes[outcome.booking_id] = outcome
        taken = [(r, "seats_lost") for r in lost] + [(r, "event_cancelled") for r in called_off]
        taken += [(r, "charge_mismatch") for r in wrong if charges[r["id"]].status == "succeeded"]
        taken += [
            (r, "unconfirmed_charge")
            for r in ended
            if r["saga_state"] in ("FAILED", "CANCELLED")
            and r["id"] in charges
            and charges[r["id"]].status == "succeeded"
        ]
        await refunds.request(
            conn,
            [
                refunds.Wanted(
                    r["id"],
                    charges[r["id"]].id,
                    charges[r["id"]].amount_cents,
                    charges[r["id"]].currency,
                    reason,
                )
                for r, reason in taken
            ],
        )
    refunding = {r["id"] for r, _ in taken}
    return {b: (outcome, b in refunding) for b, outcome in outcomes.items()}


def _own_seats(row: Any) -> list[str]:
    """The seats sold to a booking that holds its own (no hold row): those it asked for."""
    return list(row["request"].get("seat_ids") or [])


def _own_units(row: Any) -> list[tuple[str, int]]:
    """The units a booking that holds its own keeps held on its ticket type: [(type, n)]."""
    request = row["request"]
    if request.get("ticket_type_id") and not request.get("hold_id"):
        return [(request["ticket_type_id"], int(request["quantity"]))]
    return []


def _units(row: Any, live: dict[str, Any]) -> list[tuple[str, int]]:
    """The units a booking has held, by its hold or itself: [(type, n)]."""
    if not row["hold_id"]:
        return _own_units(row)
    hold = live[row["hold_id"]]
    return [(hold["ticket_type_id"], hold["quantity"])] if hold["ticket_type_id"] else []


async def _release_own(conn: Connection, rows: list[Any]) -> None:
    """Give back what failing bookings that hold their own seats or units have: the seats sold
    to them (locked by the caller), the units held on their ticket types (locked too)."""
    units: dict[str, int] = defaultdict(int)
    unit_events: set[str] = set()
    for row in rows:
        for type_id, n in _own_units(row):
            units[type_id] += n
            unit_events.add(row["event_id"])
    await holds.give_back_units(conn, units)
    mine = [(r["event_id"], s, r["id"]) for r in rows for s in _own_seats(r)]
    freed = []
    if mine:
        freed = await conn.fetch(
            """UPDATE event_seats es SET status = 'available', booking_id = NULL,
                      version = nextval('catalog_version')
               FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS m(event_id, seat_id, booking_id)
               WHERE es.event_id = ANY ($1::uuid[]) AND es.seat_id = ANY ($2::uuid[])
                 AND es.event_id = m.event_id AND es.seat_id = m.seat_id
                 AND es.booking_id = m.booking_id AND es.status = 'sold'
               RETURNING es.event_id::text, es.seat_id::text, es.version""",
            [e for e, _, _ in mine],
            [s for _, s, _ in mine],
            [b for _, _, b in mine],
        )
    changes: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for seat in freed:
        changes[seat["event_id"]].append((seat["seat_id"], "available", seat["version"]))
    rows_out: list[outbox.Row] = [("catalog", {"event_id": e}) for e in sorted(unit_events)]
    for event_id, seat_changes in sorted(changes.items()):
        rows_out += outbox.seat_rows(event_id, seat_changes)
    await outbox.add_many(conn, rows_out)


def _mismatch(row: Any, charge: payments.Charge) -> ApiError:
    log.error(
        "booking %s: the provider's charge %s is %s %d %s, the booking %d %s",
        row["id"],
        charge.id,
        charge.status,
        charge.amount_cents,
        charge.currency,
        row["total_cents"],
        row["currency"],
    )
    return ApiError(
        "payment_declined",
        "The payment did not match the booking; anything taken is refunded.",
        {"decline_code": "charge_mismatch"},
    )


# → CONFIRMED: the bookings (their history step included) and the outbox rows (the seat deltas
# and catalog changes, then the buyers' messages, all in one row) in one statement.
_CONFIRMED = """
WITH p AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) AS p(id, payment_id, note)),
moved AS (
    UPDATE bookings b SET saga_state = 'CONFIRMED', payment_status = 'succeeded',
           payment_token = '', payment_id = p.payment_id, updated_at = now(),
           history = b.history || jsonb_build_object(
               'from', 'PAYMENT_PENDING', 'to', 'CONFIRMED', 'at', now())
    FROM p WHERE b.id = ANY ($1::uuid[]) AND b.id = p.id
    RETURNING b.id)
INSERT INTO outbox (topic, payload)
SELECT * FROM unnest($4::text[], $5::jsonb[])
UNION ALL
SELECT 'users', jsonb_agg(p.note) FROM p JOIN moved USING (id) HAVING count(*) > 0
"""


async def _confirm_many(
    app: State,
    conn: Connection,
    rows: list[Any],
    results: dict[str, PaymentResult],
    live: dict[str, Any],
    seats_of: dict[str, int],
) -> tuple[list[Outcome], list[str]]:
    """Confirm the paid bookings that still have what they booked: those holding their own
    seats or units always do; those of a hold when it is whole (``live``, the active holds,
    locked; ``seats_of``, how many seats each still holds, locked). The others are returned as
    lost."""
    if not rows:
        return [], []
    ok: list[Any] = []
    leftovers: list[Any] = []
    for row in rows:
        hold = live.get(row["hold_id"])
        whole = not row["hold_id"] or (
            hold is not None
            and (hold["ticket_type_id"] is not None or seats_of[row["hold_id"]] == hold["quantity"])
        )
        (ok if whole else leftovers).append(row)
    if not ok:
        return [], [r["id"] for r in leftovers]
    outbox_rows: list[tuple[str, dict[str, Any]]] = []
    for event_id in {r["event_id"] for r in ok}:
        mine = [
            r
            for r in ok
            if r["event_id"] == event_id
            and r["hold_id"]
            and not live[r["hold_id"]]["ticket_type_id"]
        ]
        if mine:
            sold = await conn.fetch(
                """UPDATE event_seats es SET status = 'sold', booking_id = b.booking_id,
                          hold_id = NULL, hold_expires_at = NULL,
                          version = nextval('catalog_version')
                   FROM unnest($2::uuid[], $3::uuid[]) AS b(hold_id, booking_id)
                   JOIN holds h ON h.id = b.hold_id
                   WHERE es.event_id = $1 AND es.seat_id = ANY (h.seat_ids)
                     AND es.hold_id = b.hold_id AND es.status = 'held'
                   RETURNING es.seat_id::text, es.version""",
                event_id,
                [r["hold_id"] for r in mine],
                [r["id"] for r in mine],
            )
            outbox_rows += outbox.seat_rows(
                event_id, [(s["seat_id"], "sold", s["version"]) for s in sold]
            )
    units: dict[str, int] = defaultdict(int)
    unit_events: set[str] = set()
    for row in ok:
        for type_id, n in _units(row, live):
            units[type_id] += n
            unit_events.add(row["event_id"])
    outbox_rows += [("catalog", {"event_id": e}) for e in sorted(unit_events)]  # one an event
    if units:
        await conn.execute(
            """UPDATE ticket_types t SET held = t.held - u.n, sold = t.sold + u.n,
                      version = nextval('catalog_version')
               FROM unnest($1::uuid[], $2::int[]) AS u(id, n) WHERE t.id = u.id""",
            list(units),
            list(units.values()),
        )
    ids = [r["id"] for r in ok]
    taken_over = [r["hold_id"] for r in ok if r["hold_id"]]
    if taken_over:
        await conn.execute(
            "UPDATE holds SET status = 'booked' WHERE id = ANY ($1::uuid[])", taken_over
        )
    items = await conn.fetch(
        """SELECT booking_id::text, seat_id::text, ticket_type_id::text, label, price_cents
           FROM booking_items WHERE booking_id = ANY ($1::uuid[]) ORDER BY booking_id, position""",
        ids,
    )
    by_booking = {r["id"]: r for r in ok}
    ticket_ids = [str(uuid.uuid4()) for _ in items]
    tickets_of: dict[str, list[str]] = defaultdict(list)  # event id -> its new tickets' ids
    for ticket_id, item in zip(ticket_ids, items, strict=True):
        tickets_of[by_booking[item["booking_id"]]["event_id"]].append(ticket_id)
    codes: dict[str, str] = {}
    for event_id, mine in tickets_of.items():
        key = await ticketcodes.private_key(conn, app.keyring, event_id)
        # Pure CPU, some 30 µs a ticket: in the helper process, while this one serves.
        signed = await app.helper.run(
            ticketcodes.sign_many, key.private_bytes_raw(), event_id, mine
        )
        codes.update(zip(mine, signed, strict=True))
    tickets = [
        (
            ticket_id,
            item["booking_id"],
            by_booking[item["booking_id"]]["event_id"],
            by_booking[item["booking_id"]]["user_id"],
            item["seat_id"],
            item["ticket_type_id"],
            item["label"],
            codes[ticket_id],
        )
        for ticket_id, item in zip(ticket_ids, items, strict=True)
    ]
    await conn.execute(
        """INSERT INTO tickets (id, booking_id, event_id, user_id, seat_id, ticket_type_id,
                                label, code)
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[],
                                $6::uuid[], $7::text[], $8::text[])""",
        *map(list, zip(*tickets, strict=True)),
    )
    charges = [results[i] for i in ids]
    await conn.execute(
        _CONFIRMED,
        ids,
        [c.id for c in charges if isinstance(c, payments.Charge)],
        [{"user_id": r["user_id"], "message": result_message(r["id"], "confirmed")} for r in ok],
        [topic for topic, _ in outbox_rows],
        [payload for _, payload in outbox_rows],
    )
    await notifications.bookings_changed(
        conn, "booking_confirmed", [(r["id"], r["user_id"]) for r in ok]
    )
    metrics.BOOKINGS.labels("confirmed", "").inc(len(ok))
    views = _views(ok, items, tickets)
    return (
        [
            Outcome(r["id"], r["user_id"], r["event_id"], "CONFIRMED", booking=views[r["id"]])
            for r in ok
        ],
        [r["id"] for r in leftovers],
    )


def _views(rows: list[Any], items: list[Any], tickets: list[tuple[Any, ...]]) -> dict[str, Booking]:
    """The confirmed bookings as ``GET /bookings/{id}`` shows them, from what was just written."""
    views = {
        r["id"]: Booking(
            id=r["id"],
            event_id=r["event_id"],
            status="confirmed",
            items=[],
            total_cents=r["total_cents"],
            currency=r["currency"],
            payment=Payment(
                status="succeeded", provider=r["payment_provider"], amount_cents=r["total_cents"]
            ),
            tickets=[],
            created_at=r["created_at"],
        )
        for r in rows
    }
    for item in items:
        views[item["booking_id"]].items.append(
            BookingItem(
                seat_id=item["seat_id"],
                ticket_type_id=item["ticket_type_id"],
                label=item["label"],
                price_cents=item["price_cents"],
            )
        )
    for ticket_id, booking_id, _, _, _, _, label, code in tickets:
        views[booking_id].tickets.append(TicketRef(id=ticket_id, code=code, label=label))
    for view in views.values():
        view.tickets.sort(key=lambda t: (t.label, t.id))
    return views
