"""The booking saga, a queue batch at a time: the queue's side of :mod:`bilten.sagas.booking`.

The queue hands a worker many requests for one event at once. Their seats are reserved in
arrival order and their bookings written, already PAYMENT_PENDING or FAILED, in one
transaction; the rest (the
payments, concurrently, then the finish in one more transaction) runs while the next batch is
begun. The steps are the saga's own, which take a list of bookings: a batch here is a list of
up to 200, recovery or a webhook a list of one.

Each failure alone: a batch that fails for a cause of its own is split until the request at
fault is alone, which fails ``internal``; an outage (:data:`bilten.errors.UNAVAILABLE`) leaves
the batch queued instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

from bilten import bookings, errors, metrics, queue
from bilten.errors import ApiError
from bilten.sagas import booking, steps
from bilten.sagas.reserve import Raced, reserve, reserve_new
from bilten.sagas.steps import BOOKING, Outcome
from bilten.state import State

log = logging.getLogger(__name__)

# Entries whose sagas ended (or that are someone else's to end), with their outcomes.
Wave = list[tuple[queue.Entry, Outcome | None]]
Rest = Callable[[], AsyncIterator[Wave]]

# Runs of a batch's first step when a booking of one of its users and keys was written
# meanwhile (by another event's worker); the next run finds it.
RACED_TRIES = 3


async def run_batch(app: State, entries: list[queue.Entry]) -> list[Outcome | None]:
    """A queue batch in arrival order, to the end: :func:`begin_batch`, then the rest."""
    rest = await begin_batch(app, entries)
    found: dict[int, Outcome | None] = {}
    async for wave in rest():
        found.update((id(entry), outcome) for entry, outcome in wave)
    return [found[id(entry)] for entry in entries]


async def begin_batch(app: State, entries: list[queue.Entry]) -> Rest:
    """The first step of a queue batch, in one transaction: the seats reserved in arrival order
    and the bookings written (PAYMENT_PENDING, or FAILED). Returns the rest, to be
    run when the caller likes (the queue starts the next batch meanwhile): the payments,
    concurrently, the bookings finished in waves as their charges are answered; it yields each
    wave's entries with their outcomes, those that ended at once first.

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

    async def both() -> AsyncIterator[Wave]:
        async for wave in first():
            yield wave
        async for wave in second():
            yield wave

    return both


INTERNAL = "This request could not be processed."


async def _fail_alone(app: State, entry: queue.Entry) -> Rest:
    """Fail a request that made its batch fail: its booking ``FAILED`` (``internal``) if it
    has one, else only its outcome (the request could not even be recorded)."""
    error = ApiError("internal", INTERNAL)
    async with app.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(BOOKING + " FOR UPDATE", entry.request_id)
        if row is not None and row["saga_state"] == "PENDING":
            (outcome,) = await steps.fail_many(conn, [(row, error)])
        elif row is not None:
            outcome = steps.outcome_of(row)  # past the failing step already: recovery goes on
        elif entry.request is not None:
            metrics.BOOKINGS.labels("failed", error.code).inc()
            request = entry.request
            outcome = Outcome(entry.request_id, request.user_id, request.event_id, "FAILED", error)
        else:
            outcome = None

    async def done() -> AsyncIterator[Wave]:
        yield [(entry, outcome)]

    return done


async def _begin(app: State, entries: list[queue.Entry]) -> Rest:
    began = time.monotonic()
    for attempt in range(RACED_TRIES):
        try:
            booking_ids, early, outcomes, payable = await _first_step(app, entries)
            break
        except Raced:
            if attempt == RACED_TRIES - 1:
                raise
            log.info("a booking of the batch was written meanwhile; the batch runs again")

    async def rest() -> AsyncIterator[Wave]:
        entries_of: dict[str, list[queue.Entry]] = {}
        for entry, booking_id in zip(entries, booking_ids, strict=True):
            if booking_id is not None:
                entries_of.setdefault(booking_id, []).append(entry)

        def wave_of(ran: dict[str, Outcome | None]) -> Wave:
            return [(e, outcome) for b, outcome in ran.items() for e in entries_of[b]]

        # Those that ended already: before their booking, or in the reservation (None: not
        # ours to run).
        ended = [(e, o) for e, b, o in zip(entries, booking_ids, early, strict=True) if b is None]
        ended += wave_of({b: outcomes.get(b) for b in entries_of if b not in payable})
        if ended:
            yield ended
        left = set(payable)
        try:
            async for wave in booking.pay_and_finish_waves(
                app, payable, patience=app.settings.payment_outage_wait
            ):
                left -= wave.keys()
                elapsed = time.monotonic() - began
                for finished in wave.values():
                    if finished.state == "CONFIRMED":
                        metrics.SAGA_SECONDS.observe(elapsed)
                yield wave_of(dict(wave))
        except Exception:
            log.exception("finishing a booking batch failed; finishing its bookings one by one")
            for booking_id in sorted(left):
                outcome: Outcome | None
                try:
                    recovered = (await booking.recover(app, [booking_id]))[booking_id]
                    outcome = recovered or await _as_is(app, booking_id)
                except errors.UNAVAILABLE:
                    raise  # the rest of the batch stays queued and runs again
                except Exception:
                    # Each failure alone: recovery owns this booking now (None: not ours).
                    log.exception("finishing booking %s failed; recovery takes it", booking_id)
                    outcome = None
                yield wave_of({booking_id: outcome})

    return rest


async def _first_step(
    app: State, entries: list[queue.Entry]
) -> tuple[
    list[str | None], list[Outcome | None], dict[str, Outcome | None], dict[str, steps.Payable]
]:
    window = steps.payment_window(app.settings)
    async with app.db.acquire() as conn:
        async with conn.transaction():
            standing, new, currencies = await bookings.standing(conn, _requests(entries))
            booking_ids, early = _sort_out(entries, standing)
            fresh = {r.id for r in new}
            written = [b for b in booking_ids if b is not None and b not in fresh]
            if written:
                # Bookings written before (a batch handled again): the saga goes on from where
                # it is; the new requests follow in a transaction of their own, so that each
                # takes its locks in the one order (docs/bookings.md).
                outcomes, payable = await reserve(conn, written, window)
            else:  # the usual batch: all new, one transaction
                outcomes, payable = await reserve_new(conn, new, currencies, window)
        if written and new:
            async with conn.transaction():
                more, more_payable = await reserve_new(conn, new, currencies, window)
            outcomes.update(more)
            payable.update(more_payable)
    return booking_ids, early, outcomes, payable


async def _as_is(app: State, booking_id: str) -> Outcome | None:
    """The booking's outcome as the database has it (when a step ended it and then failed)."""
    row = await app.db.fetchrow(BOOKING, booking_id)
    return steps.outcome_of(row) if row is not None else None


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
