-- What a person holds or bought for an event is counted on every booking (the per-person limit):
-- without this index the count read every ticket of the event, so it slowed as the event sold.
CREATE INDEX tickets_user_event ON tickets (user_id, event_id) WHERE status <> 'void';
