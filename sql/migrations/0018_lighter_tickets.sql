-- A ticket's code begins with its id (bilten.ticketcodes), which the primary key keeps unique:
-- the unique index on code, some 130 bytes an entry, guarded nothing more, and nothing looks
-- a ticket up by its code (check-in reads the id from it).
ALTER TABLE tickets DROP CONSTRAINT tickets_code_key;
-- Tickets are counted by event only once checked in (analytics): the index keeps those alone,
-- so a ticket written in a sale adds no entry to it.
DROP INDEX tickets_event_status;
CREATE INDEX tickets_checked_in ON tickets (event_id) WHERE status = 'checked_in';
