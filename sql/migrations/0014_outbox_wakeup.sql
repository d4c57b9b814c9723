-- The outbox relay waits for a notification instead of polling (see bilten/outbox.py). A
-- notification in every writing transaction would serialise commits: PostgreSQL queues them
-- under one lock held until the commit is flushed. So an insert notifies only while the relay
-- waits, which the relay shows by holding advisory lock 122468465667173 ("obidle",
-- bilten.outbox.IDLE_LOCK) on its own connection. Otherwise the writer shares that lock until
-- it commits, and the relay cannot start waiting before it has seen this row. Both sides only
-- ever try the lock, never wait for it. Once per statement: most writers insert many rows in one.
CREATE FUNCTION outbox_wake_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(122468465667173) THEN
        PERFORM pg_notify('bilten_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_inserted
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_wake_relay();
