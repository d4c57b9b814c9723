-- Outgoing mail. Callers insert a job in the transaction that causes the mail (a transactional
-- outbox); the mail worker claims due jobs with a lease, so a sender that dies mid-send leaves
-- its jobs to be claimed again once the lease runs out (delivery is at least once).
CREATE TABLE mail_jobs (
    id           bigserial PRIMARY KEY,
    job_key      text NOT NULL UNIQUE,  -- derived from domain ids: enqueueing twice sends once
    template     text NOT NULL,
    recipient    text NOT NULL,
    context      jsonb NOT NULL DEFAULT '{}',  -- may hold tokens: emptied once the job is done
    status       text NOT NULL DEFAULT 'pending'
                 CONSTRAINT mail_jobs_status_check CHECK (status IN ('pending', 'sent', 'dead')),
    attempts     integer NOT NULL DEFAULT 0 CONSTRAINT mail_jobs_attempts_check CHECK (attempts >= 0),
    run_at       timestamptz NOT NULL DEFAULT now(),  -- next attempt
    locked_until timestamptz,  -- claim lease
    last_error   text,
    sent_at      timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX mail_jobs_due ON mail_jobs (run_at) WHERE status = 'pending';
