-- Ticket signing keys (one Ed25519 pair per event: scanners verify codes offline with the
-- public key), notifications by SMS through the durable mail queue, and check-in lookups.

CREATE TABLE event_keys (
    event_id    uuid PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    private_key bytea NOT NULL,
    public_key  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE mail_jobs ADD COLUMN channel text NOT NULL DEFAULT 'email'
    CONSTRAINT mail_jobs_channel_check CHECK (channel IN ('email', 'sms'));

CREATE INDEX tickets_event_status ON tickets (event_id, status);
