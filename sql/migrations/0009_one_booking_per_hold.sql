-- A hold is booked at most once: two requests naming the same hold must not both be charged.
CREATE UNIQUE INDEX bookings_one_per_hold ON bookings (hold_id)
    WHERE hold_id IS NOT NULL AND saga_state <> 'FAILED';
