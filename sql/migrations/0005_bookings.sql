-- Holds, bookings (the saga's persisted state), tickets and the transactional outbox.

CREATE TABLE holds (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id       uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    user_id        uuid NOT NULL REFERENCES users (id),
    ticket_type_id uuid REFERENCES ticket_types (id),
    seat_ids       uuid[] NOT NULL DEFAULT '{}',
    quantity       integer NOT NULL CHECK (quantity > 0),
    amount_cents   integer NOT NULL CHECK (amount_cents >= 0),  -- priced when held
    currency       text NOT NULL,
    status         text NOT NULL DEFAULT 'active'
                   CHECK (status IN ('active', 'released', 'expired', 'booked')),
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT holds_seats_or_units CHECK (
        (ticket_type_id IS NULL) = (cardinality(seat_ids) > 0)
        AND (ticket_type_id IS NOT NULL OR cardinality(seat_ids) = quantity)
    )
);
CREATE INDEX holds_active_expiry ON holds (expires_at) WHERE status = 'active';
CREATE INDEX holds_user_event ON holds (user_id, event_id) WHERE status = 'active';

CREATE TABLE bookings (
    id                uuid PRIMARY KEY,
    user_id           uuid NOT NULL REFERENCES users (id),
    event_id          uuid NOT NULL REFERENCES events (id),
    idempotency_key   text NOT NULL,
    body_hash         text NOT NULL,
    request           jsonb NOT NULL,        -- what was asked: hold, seats or units
    hold_id           uuid REFERENCES holds (id),
    saga_state        text NOT NULL DEFAULT 'PENDING' CHECK (saga_state IN
                      ('PENDING', 'SEATS_RESERVED', 'PAYMENT_PENDING', 'CONFIRMED', 'FAILED',
                       'CANCELLED')),
    status            text NOT NULL GENERATED ALWAYS AS (
        CASE saga_state WHEN 'CONFIRMED' THEN 'confirmed' WHEN 'FAILED' THEN 'failed'
                        WHEN 'CANCELLED' THEN 'cancelled' ELSE 'pending' END) STORED,
    total_cents       integer NOT NULL DEFAULT 0,
    currency          text NOT NULL,
    payment_provider  text NOT NULL,
    payment_token     text NOT NULL,
    payment_id        text,
    payment_status    text NOT NULL DEFAULT 'pending'
                      CHECK (payment_status IN ('pending', 'succeeded', 'failed', 'refunded')),
    -- A failed payment call whose outcome was not known: look it up and refund what was taken.
    payment_unsettled boolean NOT NULL DEFAULT false,
    failure_code      text,
    failure_message   text,
    failure_details   jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT bookings_idempotency_key UNIQUE (user_id, idempotency_key),
    -- A confirmed booking always has a captured payment; a failed one keeps no money.
    CONSTRAINT bookings_confirmed_paid CHECK (saga_state <> 'CONFIRMED' OR payment_status = 'succeeded'),
    CONSTRAINT bookings_failed_unpaid CHECK (saga_state <> 'FAILED' OR payment_status <> 'succeeded')
);
CREATE INDEX bookings_user ON bookings (user_id, created_at DESC, id DESC);
CREATE INDEX bookings_unfinished ON bookings (updated_at)
    WHERE saga_state IN ('PENDING', 'SEATS_RESERVED', 'PAYMENT_PENDING');
CREATE INDEX bookings_unsettled ON bookings (updated_at) WHERE payment_unsettled;

CREATE TABLE booking_items (
    booking_id     uuid NOT NULL REFERENCES bookings (id) ON DELETE CASCADE,
    position       integer NOT NULL,
    seat_id        uuid,
    ticket_type_id uuid,
    label          text NOT NULL,
    price_cents    integer NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (booking_id, position),
    CHECK ((seat_id IS NULL) <> (ticket_type_id IS NULL))
);

-- Append-only: every state the saga passed through, and why.
CREATE TABLE booking_transitions (
    id         bigserial PRIMARY KEY,
    booking_id uuid NOT NULL REFERENCES bookings (id) ON DELETE CASCADE,
    from_state text,
    to_state   text NOT NULL,
    reason     text,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX booking_transitions_booking ON booking_transitions (booking_id, id);

CREATE TABLE tickets (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    booking_id     uuid NOT NULL REFERENCES bookings (id),
    event_id       uuid NOT NULL REFERENCES events (id),
    user_id        uuid NOT NULL REFERENCES users (id),
    seat_id        uuid,
    ticket_type_id uuid,
    label          text NOT NULL,
    code           text NOT NULL UNIQUE,
    status         text NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'checked_in', 'void')),
    checked_in_at  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tickets_booking ON tickets (booking_id);
CREATE INDEX tickets_user ON tickets (user_id, created_at DESC, id DESC);
-- A seat has at most one live ticket per event: the last guard against selling it twice.
CREATE UNIQUE INDEX tickets_one_per_seat ON tickets (event_id, seat_id)
    WHERE seat_id IS NOT NULL AND status <> 'void';

-- Committed state changes waiting to be published (transactional outbox).
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE event_seats
    ADD CONSTRAINT event_seats_sold_has_booking CHECK (status <> 'sold' OR booking_id IS NOT NULL);

-- Provider callbacks already applied (redelivery is ignored).
CREATE TABLE payment_webhook_events (
    id          text PRIMARY KEY,
    provider    text NOT NULL,
    type        text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
