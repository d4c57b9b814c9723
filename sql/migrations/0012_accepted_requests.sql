-- Booking requests answered 202, kept until their outcome is known: PostgreSQL is the record of
-- what was accepted, the Redis stream only the dispatch path. Should Redis lose an entry (a
-- flush, a restart without its append-only file, a failover), recovery puts it back in the
-- stream from here, in arrival order (bilten/intake.py).
CREATE TABLE accepted_requests (
    id          uuid PRIMARY KEY,
    accepted_at timestamptz NOT NULL DEFAULT now(),
    request     bytea NOT NULL  -- the queue entry as the door wrote it (bilten.queue.Request)
);

CREATE INDEX accepted_requests_by_age ON accepted_requests (accepted_at, id);
