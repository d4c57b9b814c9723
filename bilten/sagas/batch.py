"""The booking saga, a queue batch at a time.

The queue hands a worker many requests for one event at once. Running each through its own
transactions costs a dozen round trips per booking; here the steps of the whole batch share
two transactions, whose writes are set-based (``unnest``), while each booking still succeeds or
fails on its own:

* reserve: the bookings are locked together; every seat the batch asks for is locked in one
  statement (in seat order, like every claim), then given out all-or-nothing per booking in
  arrival order (first come, first served);
  holds, items, state changes, transitions and outbox rows are then written in one statement
  each;
* the payments run concurrently;
* finish: paid bookings are confirmed together (seats sold, units counted, tickets issued,
  notices queued), refused ones released together.

States, transitions and invariants are exactly those of :mod:`bilten.sagas.booking`, whose
one-booking functions remain the path for holds being adopted, recovery and webhooks. If a batch
fails for an unexpected reason, the caller runs its bookings one by one instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bilten import bookings, errors, holds, metrics, notifications, payments, queue, ticketcodes
from bilten.bookings import Booking, BookingItem, Payment, TicketRef
from bilten.db import Connection
from bilten.errors import ApiError
from bilten.sagas import booking
from bilten.sagas.booking import (
    _BOOKING,
    PAYMENT_WINDOW,
    Outcome,
    PaymentResult,
    _adopt_hold,
    _result,
    finish,
)
from bilten.state import State

log = logging.getLogger(__name__)

_MANY = _BOOKING.replace("WHERE id = $1", "WHERE id = ANY ($1::uuid[]) ORDER BY id")


_LOCK_SEATS = """
SELECT es.seat_id::text, s.label, t.price_cents,
       es.status = 'available' OR (es.status = 'held' AND es.hold_expires_at <= now()) AS free
FROM event_seats es JOIN seats s ON s.id = es.seat_id JOIN price_tiers t ON t.id = es.tier_id
WHERE es.event_id = $1 AND es.seat_id = ANY ($2::uuid[])
ORDER BY es.seat_id
FOR UPDATE OF es
"""


@dataclass
class Reserved:
    row: Any
    hold_id: str
    items: list[holds.Item]
    adopted: bool
    seat_ids: list[str]
    ticket_type_id: str | None


async def _transitions(
    conn: Connection, moves: list[tuple[str, str | None, str, str | None]]
) -> None:
    if moves:
        await conn.execute(
            """INSERT INTO booking_transitions (booking_id, from_state, to_state, reason)
               SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])""",
            *map(list, zip(*moves, strict=True)),
        )


async def _outbox(conn: Connection, rows: list[tuple[str, dict[str, Any]]]) -> None:
    if rows:
        await conn.execute(
            "INSERT INTO outbox (topic, payload) SELECT * FROM unnest($1::text[], $2::jsonb[])",
            [topic for topic, _ in rows],
            [payload for _, payload in rows],
        )


def _seat_delta(event_id: str, changes: list[tuple[str, str, int]]) -> tuple[str, dict[str, Any]]:
    return (
        "seats",
        {
            "type": "seats",
            "event_id": event_id,
            "version": max(v for _, _, v in changes),
            "changes": [{"seat_id": s, "status": st, "version": v} for s, st, v in changes],
        },
    )


async def _fail_many(
    conn: Connection, failed: list[tuple[Any, ApiError]], *, unsettled: bool = False
) -> list[Outcome]:
    if not failed:
        return []
    await conn.execute(
        """UPDATE bookings b SET saga_state = 'FAILED', updated_at = now(), payment_token = '',
                  failure_code = f.code, failure_message = f.message, failure_details = f.details,
                  payment_status = 'failed', payment_unsettled = b.payment_unsettled OR f.unsettled
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::bool[])
                AS f(id, code, message, details, unsettled)
           WHERE b.id = f.id""",
        [row["id"] for row, _ in failed],
        [e.code for _, e in failed],
        [e.message for _, e in failed],
        [e.details or {} for _, e in failed],
        [unsettled and e.code == "unavailable" for _, e in failed],
    )
    await _transitions(
        conn, [(row["id"], row["saga_state"], "FAILED", e.code) for row, e in failed]
    )
    await _outbox(
        conn,
        [
            ("user", {"user_id": row["user_id"], "message": _result(row["id"], "failed", e)})
            for row, e in failed
        ],
    )
    for _, error in failed:
        metrics.BOOKINGS.labels("failed", error.code).inc()
    return [Outcome(row["id"], row["user_id"], row["event_id"], "FAILED", e) for row, e in failed]


async def _per_user_room(conn: Connection, event_id: str, rows: list[Any]) -> dict[str, int]:
    """What each user already holds or bought for the event, their limit checks locked."""
    users = sorted({row["user_id"] for row in rows})
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest($1::text[]) AS k ORDER BY k",
        [f"{user}:{event_id}" for user in users],
    )
    counts = await conn.fetch(
        """SELECT u.id::text AS user_id,
                  coalesce((SELECT sum(quantity) FROM holds h WHERE h.user_id = u.id
                            AND h.event_id = $2 AND h.status = 'active'
                            AND h.expires_at > now()), 0)
                + (SELECT count(*) FROM tickets t WHERE t.user_id = u.id AND t.event_id = $2
                   AND t.status <> 'void') AS n
           FROM unnest($1::uuid[]) AS u(id)""",
        users,
        event_id,
    )
    return {r["user_id"]: int(r["n"]) for r in counts}


async def _reserve_event(
    conn: Connection, event_id: str, rows: list[Any]
) -> tuple[list[Reserved], list[tuple[Any, ApiError]]]:
    reserved: list[Reserved] = []
    failed: list[tuple[Any, ApiError]] = []
    try:
        event = await holds.event_for_sale(conn, event_id)
    except ApiError as error:
        return [], [(row, error) for row in rows]
    limit = event["max_tickets_per_order"]
    # Ticket types are locked before seats, all at once in id order, as the finish locks them:
    # two overlapping batches of one event never wait on each other in a circle.
    await _lock_types(
        conn,
        [
            row["request"]["ticket_type_id"]
            for row in rows
            if row["request"].get("ticket_type_id") and not row["request"].get("hold_id")
        ],
    )
    room = await _per_user_room(conn, event_id, rows)
    expires_at = await conn.fetchval(
        "SELECT now() + $1::interval", timedelta(seconds=PAYMENT_WINDOW)
    )
    seat_changes: list[tuple[str, str, int]] = []
    units_changed = False
    # Every seat the batch asks for, locked at once in seat order (the order every claim locks
    # in); who gets which is then decided here, in arrival order, and written in one statement.
    wanted = sorted(
        {
            s
            for row in rows
            if not row["request"].get("hold_id")
            for s in row["request"].get("seat_ids") or []
        }
    )
    free: dict[str, tuple[str, int]] = {}
    known: set[str] = set()
    if wanted:
        for seat in await conn.fetch(_LOCK_SEATS, event_id, wanted):
            known.add(seat["seat_id"])
            if seat["free"]:
                free[seat["seat_id"]] = (seat["label"], seat["price_cents"])
    winners: list[tuple[str, str]] = []  # (seat id, hold id)
    adopted: set[str] = set()  # holds taken by earlier bookings of this batch
    for row in rows:
        request = row["request"]
        try:
            if request.get("hold_id"):
                if request["hold_id"] in adopted:
                    raise ApiError(
                        "conflict",
                        "Another booking is using this hold.",
                        {"hold_id": request["hold_id"]},
                    )
                async with conn.transaction():
                    hold_id, items = await _adopt_hold(conn, row, request["hold_id"])
                adopted.add(hold_id)
                reserved.append(Reserved(row, hold_id, items, True, [], None))
                continue
            seat_ids: list[str] = request.get("seat_ids") or []
            ticket_type_id: str | None = request.get("ticket_type_id")
            quantity = len(seat_ids) or int(request.get("quantity") or 0)
            if quantity > limit:
                raise holds.over_order_limit(limit, bool(seat_ids))
            already = room.get(row["user_id"], 0)
            if already + quantity > limit:
                raise holds.over_person_limit(limit, already)
            hold_id = str(uuid.uuid4())
            if seat_ids:
                unknown = [s for s in seat_ids if s not in known]
                if unknown:
                    raise ApiError(
                        "validation_error",
                        "seat_ids: not seats of this event",
                        {
                            "fields": [{"field": "seat_ids", "message": "unknown seat"}],
                            "seat_ids": unknown,
                        },
                    )
                taken = [s for s in seat_ids if s not in free]
                if taken:
                    raise holds.seat_unavailable(taken)
                items = [
                    holds.Item(seat_id=s, label=free[s][0], price_cents=free[s][1])
                    for s in sorted(seat_ids, key=lambda s: free[s][0])
                ]
                for s in seat_ids:
                    del free[s]
                    winners.append((s, hold_id))
            else:
                assert ticket_type_id is not None
                async with conn.transaction():  # a refused claim leaves nothing behind
                    items = await holds.claim_units(conn, event_id, ticket_type_id, quantity)
                units_changed = True
        except ApiError as error:
            failed.append((row, error))
            continue
        room[row["user_id"]] = room.get(row["user_id"], 0) + quantity
        reserved.append(Reserved(row, hold_id, items, False, seat_ids, ticket_type_id))
    if winners:
        claimed = await conn.fetch(
            """UPDATE event_seats es
               SET status = 'held', hold_id = w.hold_id, hold_expires_at = $2, booking_id = NULL,
                   version = nextval('catalog_version')
               FROM unnest($3::uuid[], $4::uuid[]) AS w(seat_id, hold_id)
               WHERE es.event_id = $1 AND es.seat_id = w.seat_id
               RETURNING es.seat_id::text, es.version""",
            event_id,
            expires_at,
            [s for s, _ in winners],
            [h for _, h in winners],
        )
        seat_changes += [(c["seat_id"], "held", c["version"]) for c in claimed]
    fresh = [r for r in reserved if not r.adopted]
    if fresh:
        await conn.execute(
            """INSERT INTO holds (id, event_id, user_id, ticket_type_id, seat_ids, quantity,
                                  amount_cents, currency, expires_at)
               SELECT h.id, $1, h.user_id, h.ticket_type_id, ARRAY(
                          SELECT jsonb_array_elements_text(h.seats::jsonb))::uuid[],
                      h.quantity, h.amount, $2, $3
               FROM unnest($4::uuid[], $5::uuid[], $6::uuid[], $7::text[], $8::int[], $9::int[])
                    AS h(id, user_id, ticket_type_id, seats, quantity, amount)""",
            event_id,
            event["currency"],
            expires_at,
            [r.hold_id for r in fresh],
            [r.row["user_id"] for r in fresh],
            [r.ticket_type_id for r in fresh],
            [_json_list(r.seat_ids) for r in fresh],
            [len(r.items) for r in fresh],
            [sum(i.price_cents for i in r.items) for r in fresh],
        )
    outbox_rows = [_seat_delta(event_id, seat_changes)] if seat_changes else []
    if units_changed:
        outbox_rows.append(("catalog", {"event_id": event_id}))
    await _outbox(conn, outbox_rows)
    return reserved, failed


async def _lock_types(conn: Connection, type_ids: list[str]) -> None:
    """Lock ticket types in id order."""
    ids = sorted(set(type_ids))
    if ids:
        await conn.execute(
            "SELECT 1 FROM ticket_types WHERE id = ANY ($1::uuid[]) ORDER BY id FOR UPDATE", ids
        )


def _json_list(values: list[str]) -> str:
    return "[" + ",".join(f'"{v}"' for v in values) + "]"


@dataclass(frozen=True)
class Payable:
    amount_cents: int
    currency: str
    token: str


async def reserve_batch(app: State, booking_ids: list[str]) -> dict[str, Outcome | None]:
    """PENDING → PAYMENT_PENDING (or FAILED) for a batch; None for bookings someone else has."""
    async with app.db.acquire() as conn, conn.transaction():
        outcomes, _ = await _reserve(conn, booking_ids)
    return outcomes


async def _reserve(
    conn: Connection, booking_ids: list[str]
) -> tuple[dict[str, Outcome | None], dict[str, Payable]]:
    """:func:`reserve_batch` in the caller's transaction; also what each reserved booking pays."""
    outcomes: dict[str, Outcome | None] = dict.fromkeys(booking_ids)
    rows = await conn.fetch(
        _MANY.replace("ORDER BY id", "ORDER BY id FOR UPDATE SKIP LOCKED"), booking_ids
    )
    by_id = {row["id"]: row for row in rows}
    pending_by_event: dict[str, list[Any]] = defaultdict(list)
    payable: dict[str, Payable] = {}
    for booking_id in booking_ids:  # arrival order
        row = by_id.get(booking_id)
        if row is None:
            continue
        if row["saga_state"] != "PENDING":
            outcomes[booking_id] = _outcome_of(row)
            if row["saga_state"] == "PAYMENT_PENDING":
                # Reserved by a worker that stopped: charging again with the same key finds
                # the first charge, if there was one.
                payable[booking_id] = Payable(
                    row["total_cents"], row["currency"], row["payment_token"]
                )
        else:
            pending_by_event[row["event_id"]].append(row)
    reserved: list[Reserved] = []
    failed: list[tuple[Any, ApiError]] = []
    for event_id, event_rows in pending_by_event.items():
        ok, bad = await _reserve_event(conn, event_id, event_rows)
        reserved += ok
        failed += bad
    if reserved:
        items = [(r.row["id"], n, i) for r in reserved for n, i in enumerate(r.items)]
        await conn.execute(
            """INSERT INTO booking_items (booking_id, position, seat_id, ticket_type_id,
                                          label, price_cents)
               SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::uuid[],
                                    $5::text[], $6::int[])""",
            [b for b, _, _ in items],
            [n for _, n, _ in items],
            [i.seat_id for _, _, i in items],
            [i.ticket_type_id for _, _, i in items],
            [i.label for _, _, i in items],
            [i.price_cents for _, _, i in items],
        )
        await conn.execute(
            """UPDATE bookings b SET hold_id = r.hold_id, total_cents = r.total,
                      saga_state = 'PAYMENT_PENDING', updated_at = now()
               FROM unnest($1::uuid[], $2::uuid[], $3::int[]) AS r(id, hold_id, total)
               WHERE b.id = r.id""",
            [r.row["id"] for r in reserved],
            [r.hold_id for r in reserved],
            [sum(i.price_cents for i in r.items) for r in reserved],
        )
        # PAYMENT_PENDING is committed before any provider call: a crash leaves an
        # outcome that recovery looks up instead of guessing.
        await _transitions(
            conn,
            [(r.row["id"], "PENDING", "SEATS_RESERVED", None) for r in reserved]
            + [(r.row["id"], "SEATS_RESERVED", "PAYMENT_PENDING", None) for r in reserved],
        )
    for outcome in await _fail_many(conn, failed):
        outcomes[outcome.booking_id] = outcome
    for r in reserved:
        outcomes[r.row["id"]] = Outcome(
            r.row["id"], r.row["user_id"], r.row["event_id"], "PAYMENT_PENDING"
        )
        payable[r.row["id"]] = Payable(
            sum(i.price_cents for i in r.items), r.row["currency"], r.row["payment_token"]
        )
    return outcomes, payable


async def _charge(app: State, booking_id: str, due: Payable) -> PaymentResult:
    try:
        return await app.payments.charge(
            key=booking_id, amount_cents=due.amount_cents, currency=due.currency, token=due.token
        )
    except (payments.PaymentDeclined, payments.ProviderUnavailable) as exc:
        return exc


async def finish_batch(
    app: State, results: dict[str, PaymentResult]
) -> tuple[dict[str, Outcome], list[str]]:
    """Confirm the paid, release the refused; returns the outcomes, and the paid bookings whose
    seats were gone (the caller settles those one by one: they need a refund)."""
    outcomes: dict[str, Outcome] = {}
    leftovers: list[str] = []
    async with app.db.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_MANY + " FOR UPDATE", list(results))
        rows = [r for r in rows if r["saga_state"] == "PAYMENT_PENDING"]
        kinds = await conn.fetch(
            "SELECT DISTINCT ticket_type_id::text FROM holds WHERE id = ANY ($1::uuid[])"
            " AND ticket_type_id IS NOT NULL",
            [r["hold_id"] for r in rows],
        )
        await _lock_types(conn, [k["ticket_type_id"] for k in kinds])
        paid = [r for r in rows if isinstance(results[r["id"]], payments.Charge)]
        refused = [r for r in rows if not isinstance(results[r["id"]], payments.Charge)]
        confirmed, leftovers = await _confirm_many(app, conn, paid, results)
        for outcome in confirmed:
            outcomes[outcome.booking_id] = outcome
        await _release_many(conn, refused)
        failed: list[tuple[Any, ApiError]] = []
        for row in refused:
            result = results[row["id"]]
            if isinstance(result, payments.PaymentDeclined):
                failed.append(
                    (
                        row,
                        ApiError(
                            "payment_declined",
                            "The card was declined.",
                            {"decline_code": result.decline_code},
                        ),
                    )
                )
            else:
                failed.append(
                    (
                        row,
                        ApiError(
                            "unavailable",
                            "The payment provider is unavailable; nothing was charged.",
                            headers={"Retry-After": "5"},
                        ),
                    )
                )
        for outcome in await _fail_many(conn, failed, unsettled=True):
            outcomes[outcome.booking_id] = outcome
    return outcomes, leftovers


async def _release_many(conn: Connection, rows: list[Any]) -> None:
    if not rows:
        return
    released = await conn.fetch(
        """UPDATE holds SET status = 'released' WHERE id = ANY ($1::uuid[]) AND status = 'active'
           RETURNING id::text, event_id::text, ticket_type_id::text, quantity""",
        [r["hold_id"] for r in rows],
    )
    units: dict[str, int] = defaultdict(int)
    outbox_rows = []
    for event_id in {h["event_id"] for h in released}:
        seat_holds = [
            h["id"] for h in released if h["event_id"] == event_id and not h["ticket_type_id"]
        ]
        if seat_holds:
            freed = await conn.fetch(
                """UPDATE event_seats SET status = 'available', hold_id = NULL,
                          hold_expires_at = NULL, version = nextval('catalog_version')
                   WHERE event_id = $1 AND hold_id = ANY ($2::uuid[]) AND status = 'held'
                   RETURNING seat_id::text, version""",
                event_id,
                seat_holds,
            )
            if freed:
                outbox_rows.append(
                    _seat_delta(
                        event_id, [(f["seat_id"], "available", f["version"]) for f in freed]
                    )
                )
    for h in released:
        if h["ticket_type_id"]:
            units[h["ticket_type_id"]] += h["quantity"]
            outbox_rows.append(("catalog", {"event_id": h["event_id"]}))
    if units:
        await conn.execute(
            """UPDATE ticket_types t SET held = t.held - u.n, version = nextval('catalog_version')
               FROM unnest($1::uuid[], $2::int[]) AS u(id, n) WHERE t.id = u.id""",
            list(units),
            list(units.values()),
        )
    await _outbox(conn, outbox_rows)


async def _confirm_many(
    app: State, conn: Connection, rows: list[Any], results: dict[str, PaymentResult]
) -> tuple[list[Outcome], list[str]]:
    if not rows:
        return [], []
    hold_rows = await conn.fetch(
        """SELECT id::text, ticket_type_id::text, quantity FROM holds
           WHERE id = ANY ($1::uuid[]) AND status = 'active' ORDER BY id FOR UPDATE""",
        [r["hold_id"] for r in rows],
    )
    live = {h["id"]: h for h in hold_rows}
    # Seats still held by each hold (locked): a hold that lost any is settled one by one.
    held = await conn.fetch(
        """SELECT hold_id::text, event_id::text FROM event_seats
           WHERE hold_id = ANY ($1::uuid[]) AND status = 'held' ORDER BY seat_id FOR UPDATE""",
        [h for h in live if not live[h]["ticket_type_id"]],
    )
    seats_of: dict[str, int] = defaultdict(int)
    for seat in held:
        seats_of[seat["hold_id"]] += 1
    ok: list[Any] = []
    leftovers: list[Any] = []
    for row in rows:
        hold = live.get(row["hold_id"])
        whole = hold is not None and (
            hold["ticket_type_id"] is not None or seats_of[row["hold_id"]] == hold["quantity"]
        )
        (ok if whole else leftovers).append(row)
    if not ok:
        return [], [r["id"] for r in leftovers]
    outbox_rows: list[tuple[str, dict[str, Any]]] = []
    for event_id in {r["event_id"] for r in ok}:
        mine = [
            r for r in ok if r["event_id"] == event_id and not live[r["hold_id"]]["ticket_type_id"]
        ]
        if mine:
            sold = await conn.fetch(
                """UPDATE event_seats es SET status = 'sold', booking_id = b.booking_id,
                          hold_id = NULL, hold_expires_at = NULL,
                          version = nextval('catalog_version')
                   FROM unnest($2::uuid[], $3::uuid[]) AS b(hold_id, booking_id)
                   WHERE es.event_id = $1 AND es.hold_id = b.hold_id AND es.status = 'held'
                   RETURNING es.seat_id::text, es.version""",
                event_id,
                [r["hold_id"] for r in mine],
                [r["id"] for r in mine],
            )
            outbox_rows.append(
                _seat_delta(event_id, [(s["seat_id"], "sold", s["version"]) for s in sold])
            )
    units: dict[str, int] = defaultdict(int)
    for row in ok:
        hold = live[row["hold_id"]]
        if hold["ticket_type_id"]:
            units[hold["ticket_type_id"]] += hold["quantity"]
            outbox_rows.append(("catalog", {"event_id": row["event_id"]}))
    if units:
        await conn.execute(
            """UPDATE ticket_types t SET held = t.held - u.n, sold = t.sold + u.n,
                      version = nextval('catalog_version')
               FROM unnest($1::uuid[], $2::int[]) AS u(id, n) WHERE t.id = u.id""",
            list(units),
            list(units.values()),
        )
    ids = [r["id"] for r in ok]
    await conn.execute(
        "UPDATE holds SET status = 'booked' WHERE id = ANY ($1::uuid[])",
        [r["hold_id"] for r in ok],
    )
    items = await conn.fetch(
        """SELECT booking_id::text, seat_id::text, ticket_type_id::text, label, price_cents
           FROM booking_items WHERE booking_id = ANY ($1::uuid[]) ORDER BY booking_id, position""",
        ids,
    )
    by_booking = {r["id"]: r for r in ok}
    signing = {e: await ticketcodes.private_key(conn, e) for e in {r["event_id"] for r in ok}}
    tickets = []
    for item in items:
        booking = by_booking[item["booking_id"]]
        ticket_id = str(uuid.uuid4())
        code = ticketcodes.sign(signing[booking["event_id"]], ticket_id, booking["event_id"])
        tickets.append(
            (
                ticket_id,
                booking["id"],
                booking["event_id"],
                booking["user_id"],
                item["seat_id"],
                item["ticket_type_id"],
                item["label"],
                code,
            )
        )
    await conn.execute(
        """INSERT INTO tickets (id, booking_id, event_id, user_id, seat_id, ticket_type_id,
                                label, code)
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[],
                                $6::uuid[], $7::text[], $8::text[])""",
        *map(list, zip(*tickets, strict=True)),
    )
    charges = [results[i] for i in ids]
    await conn.execute(
        """UPDATE bookings b SET saga_state = 'CONFIRMED', payment_status = 'succeeded',
                  payment_token = '',
                  payment_id = p.payment_id, updated_at = now()
           FROM unnest($1::uuid[], $2::text[]) AS p(id, payment_id) WHERE b.id = p.id""",
        ids,
        [c.id for c in charges if isinstance(c, payments.Charge)],
    )
    await _transitions(conn, [(i, "PAYMENT_PENDING", "CONFIRMED", None) for i in ids])
    outbox_rows += [
        ("user", {"user_id": r["user_id"], "message": _result(r["id"], "confirmed")}) for r in ok
    ]
    await _outbox(conn, outbox_rows)
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


Rest = Callable[[], Awaitable[list[Outcome | None]]]


async def run_batch(app: State, entries: list[queue.Entry]) -> list[Outcome | None]:
    """A queue batch in arrival order, to the end: :func:`begin_batch`, then the rest."""
    rest = await begin_batch(app, entries)
    return await rest()


async def begin_batch(app: State, entries: list[queue.Entry]) -> Rest:
    """The first step of a queue batch, in one transaction: the bookings made (PENDING) and
    their seats reserved in arrival order (PAYMENT_PENDING, or FAILED). Returns the rest, to be
    awaited when the caller likes (the queue starts the next batch meanwhile): the payments,
    concurrently, then the finish, in one more transaction.

    Each failure alone: a batch that fails for a cause of its own (not an outage: that pauses
    the queue, see :data:`errors.UNAVAILABLE`) is split in halves, each begun in turn (so
    arrival order still decides), until the request at fault is alone; that one fails with
    ``internal`` and the others go on. No request can stop an event's queue.
    """
    try:
        return await _begin(app, entries)
    except errors.UNAVAILABLE:
        raise
    except Exception:
        if len(entries) == 1:
            log.exception("booking request %s could not be processed", entries[0].request_id)
            return await _fail_alone(app, entries[0])
        log.warning("a booking batch of %d failed; splitting it", len(entries), exc_info=True)
    half = len(entries) // 2
    first = await begin_batch(app, entries[:half])
    second = await begin_batch(app, entries[half:])

    async def both() -> list[Outcome | None]:
        return [*await first(), *await second()]

    return both


INTERNAL = "This request could not be processed."


async def _fail_alone(app: State, entry: queue.Entry) -> Rest:
    """Fail a request that made its batch fail: its booking ``FAILED`` (``internal``) if it
    has one, else only its outcome (the request could not even be recorded)."""
    error = ApiError("internal", INTERNAL)
    async with app.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_BOOKING + " FOR UPDATE", entry.request_id)
        if row is not None and row["saga_state"] == "PENDING":
            (outcome,) = await _fail_many(conn, [(row, error)])
        elif row is not None:
            outcome = _outcome_of(row)  # past the failing step already: recovery goes on
        elif entry.request is not None:
            metrics.BOOKINGS.labels("failed", error.code).inc()
            request = entry.request
            outcome = Outcome(entry.request_id, request.user_id, request.event_id, "FAILED", error)
        else:
            outcome = None

    async def done() -> list[Outcome | None]:
        return [outcome]

    return done


async def _begin(app: State, entries: list[queue.Entry]) -> Rest:
    began = time.monotonic()
    async with app.db.acquire() as conn, conn.transaction():
        standing = await bookings.create_many(conn, _requests(entries))
        booking_ids, early = _sort_out(entries, standing)
        outcomes, payable = await _reserve(conn, [b for b in booking_ids if b is not None])

    async def rest() -> list[Outcome | None]:
        try:
            outcomes.update(await _pay_and_finish(app, payable))
        except Exception:
            log.exception("finishing a booking batch failed; finishing its bookings one by one")
            for booking_id in payable:
                try:
                    outcomes[booking_id] = await booking.recover(app, booking_id) or await _as_is(
                        app, booking_id
                    )
                except errors.UNAVAILABLE:
                    raise  # the batch stays queued and runs again
                except Exception:
                    # Each failure alone: recovery owns this booking now (None: not ours).
                    log.exception("finishing booking %s failed; recovery takes it", booking_id)
                    outcomes[booking_id] = None
        elapsed = time.monotonic() - began
        for outcome in outcomes.values():
            if outcome is not None and outcome.state == "CONFIRMED":
                metrics.SAGA_SECONDS.observe(elapsed)
        return _merge(booking_ids, early, outcomes)

    return rest


async def _as_is(app: State, booking_id: str) -> Outcome | None:
    """The booking's outcome as the database has it (when a step ended it and then failed)."""
    row = await app.db.fetchrow(_BOOKING, booking_id)
    return _outcome_of(row) if row is not None else None


def _outcome_of(row: Any) -> Outcome:
    """A booking row (of ``_BOOKING``) as an outcome, with its failure when it failed."""
    error = None
    if row["saga_state"] == "FAILED" and row["failure_code"]:
        details = row["failure_details"] or {}
        error = ApiError(row["failure_code"], row["failure_message"] or "", details)
    return Outcome(row["id"], row["user_id"], row["event_id"], row["saga_state"], error)


def _requests(entries: list[queue.Entry]) -> list[queue.Request]:
    return [e.request for e in entries if e.request is not None]


def _sort_out(
    entries: list[queue.Entry], standing: dict[str, tuple[str, str, str]]
) -> tuple[list[str | None], list[Outcome | None]]:
    """For each entry, its booking to run, or (None and) its outcome when it ends here."""
    booking_ids: list[str | None] = []
    outcomes: list[Outcome | None] = []
    for entry in entries:
        request = entry.request
        found = standing.get(entry.request_id)
        if request is None or (found is not None and found[0] == entry.request_id):
            booking_ids.append(entry.request_id)  # its own booking, new or made before
            outcomes.append(None)
            continue
        booking_ids.append(None)
        if found is None or found[1] != request.digest:
            error = (
                ApiError("not_found", "No such event, or the account is gone.")
                if found is None
                else bookings.key_reused(request.key)
            )
            outcomes.append(
                Outcome(entry.request_id, request.user_id, request.event_id, "FAILED", error)
            )
        else:
            # A repeat of an earlier request whose key Redis no longer knew: it is that booking.
            outcomes.append(
                Outcome(
                    found[0],
                    request.user_id,
                    request.event_id,
                    found[2],
                    request_id=entry.request_id,
                )
            )
    return booking_ids, outcomes


def _merge(
    booking_ids: list[str | None],
    early: list[Outcome | None],
    ran: dict[str, Outcome | None],
) -> list[Outcome | None]:
    return [
        ran.get(booking_id) if booking_id is not None else outcome
        for booking_id, outcome in zip(booking_ids, early, strict=True)
    ]


OUTAGE_PAUSE = (0.5, 8.0)  # seconds between charges again while the provider is out: first, most


async def _charge_all(app: State, payable: dict[str, Payable]) -> dict[str, PaymentResult]:
    """Charge concurrently. A provider outage pauses the batch, not fails it: what the provider
    could not answer is charged again (same key: never twice) with a growing pause, for up to
    ``payment_outage_wait`` seconds; only then does it fail ``unavailable``. Declines are final
    at once. The event's queue waits meanwhile: with the provider out, it could sell nothing."""
    charged = await asyncio.gather(*(_charge(app, b, due) for b, due in payable.items()))
    results: dict[str, PaymentResult] = dict(zip(payable, charged, strict=True))
    deadline = time.monotonic() + app.settings.payment_outage_wait
    pause = OUTAGE_PAUSE[0]
    while True:
        out = [b for b, r in results.items() if isinstance(r, payments.ProviderUnavailable)]
        if not out or time.monotonic() + pause > deadline:
            return results
        log.warning("payment provider unavailable: %d charge(s) wait %.1f s", len(out), pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, OUTAGE_PAUSE[1])
        again = await asyncio.gather(*(_charge(app, b, payable[b]) for b in out))
        results.update(zip(out, again, strict=True))


async def _pay_and_finish(app: State, payable: dict[str, Payable]) -> dict[str, Outcome | None]:
    if not payable:
        return {}
    results = await _charge_all(app, payable)
    finished, leftovers = await finish_batch(app, results)
    outcomes: dict[str, Outcome | None] = dict(finished)
    for booking_id in leftovers:
        outcomes[booking_id] = await finish(app, booking_id, results[booking_id])
    return outcomes
