-- A seat row is updated twice per booking (held, then sold) and once per hold. With an index
-- on a column those updates change (hold_id, version), each wrote new entries into every index
-- of event_seats. Without them, and with room left in each page, the updates are HOT: the row
-- version goes on the same page and no index is touched.
--
-- * The greatest seat version of an event (the seat map's version) is kept in seat_map_commits,
--   written by the statement triggers that count seat-map changes (inserts now too).
-- * The seats of a hold are found through the hold's own seat list (holds.seat_ids), by the
--   primary key, and checked to be still held by it.
ALTER TABLE seat_map_commits ADD COLUMN version bigint NOT NULL DEFAULT 0;
DROP INDEX seat_map_commits_event;
CREATE INDEX seat_map_commits_event ON seat_map_commits (event_id) INCLUDE (weight, version);
INSERT INTO seat_map_commits (event_id, version)
SELECT event_id, max(version) FROM event_seats GROUP BY event_id;

CREATE OR REPLACE FUNCTION count_seat_map_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seat_map_commits (event_id, version)
    SELECT event_id, max(version) FROM changed GROUP BY event_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER event_seats_added
    AFTER INSERT ON event_seats
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION count_seat_map_change();

DROP INDEX event_seats_version;
DROP INDEX event_seats_hold;
ALTER TABLE event_seats SET (fillfactor = 80);
