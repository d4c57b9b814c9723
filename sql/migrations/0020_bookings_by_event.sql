-- An event's bookings, found without reading everyone's: the organizer's stats, the recovery
-- worker's claim of the bookings of cancelled events (every second, on every instance). On the
-- event id alone, which never changes: the saga's updates stay as they are.
CREATE INDEX bookings_event ON bookings (event_id);
