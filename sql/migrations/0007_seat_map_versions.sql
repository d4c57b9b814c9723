-- Sequence values are taken before commit, so two changes can commit in the opposite order of
-- their versions, and the greatest seat version alone may not move when the second commits.
-- Every statement that changes an event's seats therefore also bumps one of 16 counters of that
-- event (a random one, so concurrent changes rarely wait for each other): their sum rises with
-- every commit, whatever the order, and goes into the seat map's ETag and cache keys.
CREATE TABLE seat_map_versions (
    event_id uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    shard    smallint NOT NULL CHECK (shard BETWEEN 0 AND 15),
    version  bigint NOT NULL,
    PRIMARY KEY (event_id, shard)
);

CREATE FUNCTION bump_seat_map_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seat_map_versions AS v (event_id, shard, version)
    SELECT event_id, floor(random() * 16)::smallint, nextval('catalog_version')
    FROM (SELECT DISTINCT event_id FROM changed) AS events
    ON CONFLICT (event_id, shard)
        DO UPDATE SET version = greatest(v.version + 1, EXCLUDED.version);
    RETURN NULL;
END
$$;

CREATE TRIGGER event_seats_changed
    AFTER UPDATE ON event_seats
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION bump_seat_map_version();
