-- Money moves as durable intent: a refund is recorded in the transaction that decides it (a
-- cancel, a payment that outlived its seats, a charge found for a booking that failed), and
-- carried out afterwards by a worker that retries until the provider confirms it
-- (bilten/refunds.py). While it is under way the booking's payment reads 'refunding'.
ALTER TABLE bookings DROP CONSTRAINT bookings_payment_status_check;
ALTER TABLE bookings ADD CONSTRAINT bookings_payment_status_check
    CHECK (payment_status IN ('pending', 'succeeded', 'failed', 'refunding', 'refunded'));

CREATE TABLE refunds (
    booking_id   uuid PRIMARY KEY REFERENCES bookings (id),  -- one refund, in full, per booking
    payment_id   text NOT NULL,
    amount_cents integer NOT NULL CHECK (amount_cents >= 0),
    currency     text NOT NULL,
    reason       text NOT NULL,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'refunded', 'dead')),
    attempts     integer NOT NULL DEFAULT 0,
    next_at      timestamptz NOT NULL DEFAULT now(),  -- also the lease of the worker trying it
    last_error   text,
    refund_id    text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz
);

CREATE INDEX refunds_due ON refunds (next_at) WHERE status = 'pending';
