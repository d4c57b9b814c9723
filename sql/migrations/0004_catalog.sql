-- Catalog: venues with their seat layout, events, price tiers, general-admission ticket types,
-- and each event's seat inventory.

-- Every change to an event's inventory or details takes a value from this sequence. An event's
-- version is the greatest value among its rows: it moves on every change without a hot row that
-- every hold would have to update (and wait for).
CREATE SEQUENCE catalog_version;

CREATE TABLE venues (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id   uuid NOT NULL REFERENCES users (id),
    name       text NOT NULL,
    address    text NOT NULL,
    city       text NOT NULL,
    country    text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    timezone   text NOT NULL,
    seat_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX venues_owner ON venues (owner_id, created_at);

CREATE TABLE sections (
    id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    venue_id uuid NOT NULL REFERENCES venues (id) ON DELETE CASCADE,
    name     text NOT NULL,
    position integer NOT NULL,
    x        real NOT NULL,
    y        real NOT NULL,
    CONSTRAINT sections_venue_name_key UNIQUE (venue_id, name)
);

CREATE TABLE seats (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    venue_id   uuid NOT NULL REFERENCES venues (id) ON DELETE CASCADE,
    section_id uuid NOT NULL REFERENCES sections (id) ON DELETE CASCADE,
    row_label  text NOT NULL,
    row_index  integer NOT NULL,
    number     integer NOT NULL CHECK (number > 0),
    label      text NOT NULL,
    x          real NOT NULL,
    y          real NOT NULL,
    CONSTRAINT seats_position_key UNIQUE (section_id, row_label, number)
);
CREATE INDEX seats_venue ON seats (venue_id);

CREATE TABLE events (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organizer_id          uuid NOT NULL REFERENCES users (id),
    venue_id              uuid NOT NULL REFERENCES venues (id),
    title                 text NOT NULL,
    description           text NOT NULL DEFAULT '',
    category              text NOT NULL,
    city                  text NOT NULL,  -- the venue's, kept here for search
    starts_at             timestamptz NOT NULL,
    ends_at               timestamptz NOT NULL,
    currency              text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    sale_starts_at        timestamptz,
    max_tickets_per_order integer NOT NULL DEFAULT 10 CHECK (max_tickets_per_order BETWEEN 1 AND 100),
    status                text NOT NULL DEFAULT 'draft'
                          CHECK (status IN ('draft', 'published', 'cancelled', 'completed')),
    image_url             text,
    min_price_cents       integer NOT NULL DEFAULT 0,
    max_price_cents       integer NOT NULL DEFAULT 0,
    version               bigint NOT NULL DEFAULT nextval('catalog_version'),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    search                tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english', title), 'A')
        || setweight(to_tsvector('english', category), 'B')
        || setweight(to_tsvector('english', city), 'B')
        || setweight(to_tsvector('english', description), 'C')
    ) STORED,
    CONSTRAINT events_ends_after_start CHECK (ends_at > starts_at),
    CONSTRAINT events_sale_before_end CHECK (sale_starts_at IS NULL OR sale_starts_at < ends_at)
);
-- Public listing and keyset pagination: published events in start order.
CREATE INDEX events_published_start ON events (starts_at, id) WHERE status = 'published';
CREATE INDEX events_search ON events USING gin (search);
CREATE INDEX events_organizer ON events (organizer_id, starts_at, id);
CREATE INDEX events_category_start ON events (lower(category), starts_at) WHERE status = 'published';
CREATE INDEX events_city_start ON events (lower(city), starts_at) WHERE status = 'published';

CREATE TABLE price_tiers (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id    uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    name        text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0),
    sections    text[] NOT NULL,
    CONSTRAINT price_tiers_event_name_key UNIQUE (event_id, name)
);

CREATE TABLE ticket_types (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id    uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    name        text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0),
    capacity    integer NOT NULL CHECK (capacity > 0),
    sold        integer NOT NULL DEFAULT 0 CHECK (sold >= 0),
    held        integer NOT NULL DEFAULT 0 CHECK (held >= 0),
    version     bigint NOT NULL DEFAULT nextval('catalog_version'),
    CONSTRAINT ticket_types_event_name_key UNIQUE (event_id, name),
    -- The quota: whatever the interleaving, never more out than exists.
    CONSTRAINT ticket_types_within_capacity CHECK (sold + held <= capacity)
);
CREATE INDEX ticket_types_event ON ticket_types (event_id);

-- One row per seat on sale for an event, materialised from the venue when the event is created.
CREATE TABLE event_seats (
    event_id        uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    seat_id         uuid NOT NULL REFERENCES seats (id),
    tier_id         uuid NOT NULL REFERENCES price_tiers (id),
    status          text NOT NULL DEFAULT 'available' CHECK (status IN ('available', 'held', 'sold')),
    hold_id         uuid,
    hold_expires_at timestamptz,
    booking_id      uuid,
    version         bigint NOT NULL DEFAULT nextval('catalog_version'),
    PRIMARY KEY (event_id, seat_id),
    CONSTRAINT event_seats_hold_consistent CHECK (
        (status = 'held') = (hold_id IS NOT NULL AND hold_expires_at IS NOT NULL)
    )
);
CREATE INDEX event_seats_version ON event_seats (event_id, version);
