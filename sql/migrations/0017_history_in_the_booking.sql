-- A booking's transitions were a row each in booking_transitions (three or four per booking,
-- with two index entries each). They are now kept in the booking row itself, appended by the
-- same UPDATE that moves its state: the history costs no row and no index entry of its own.
-- Each step is {"from", "to", "reason", "at"}, in order.
ALTER TABLE bookings ADD COLUMN history jsonb NOT NULL DEFAULT '[]';

UPDATE bookings b SET history = t.steps
FROM (SELECT booking_id,
             jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                 'from', from_state, 'to', to_state, 'reason', reason, 'at', at)) ORDER BY id)
                 AS steps
      FROM booking_transitions GROUP BY booking_id) t
WHERE b.id = t.booking_id;

DROP TABLE booking_transitions;
