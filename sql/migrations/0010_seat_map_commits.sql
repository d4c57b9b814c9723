-- 0007 counted seat-map changes in 16 counters per event. Bumping a counter row holds its lock
-- until commit, and a transaction that also waits for seat rows another one has locked while
-- that one waits for the counter can deadlock. Instead every statement that changes an event's
-- seats now inserts a row here: inserts never wait for each other, and the sum of the weights
-- rises with every commit whatever the order. The recovery worker folds an event's rows into
-- one row of the same total weight (one statement), so the sum stays cheap to read.
DROP TRIGGER event_seats_changed ON event_seats;
DROP FUNCTION bump_seat_map_version();
DROP TABLE seat_map_versions;

CREATE TABLE seat_map_commits (
    event_id uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    weight   bigint NOT NULL DEFAULT 1 CHECK (weight > 0)
);
CREATE INDEX seat_map_commits_event ON seat_map_commits (event_id) INCLUDE (weight);

CREATE FUNCTION count_seat_map_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seat_map_commits (event_id) SELECT DISTINCT event_id FROM changed;
    RETURN NULL;
END
$$;

CREATE TRIGGER event_seats_changed
    AFTER UPDATE ON event_seats
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION count_seat_map_change();
