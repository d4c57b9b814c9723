-- Confirming or releasing a hold finds its seats by hold id; without this every such statement
-- filters all the seats of the event.
CREATE INDEX event_seats_hold ON event_seats (hold_id) WHERE hold_id IS NOT NULL;
