-- A refund the provider accepted and later reported failed (the card's account closed, say) is
-- made again. Each round is a new request to the provider under an idempotency key of its own:
-- a provider answers a key it has seen with its first answer, the failed refund, for a day.
ALTER TABLE refunds ADD COLUMN round integer NOT NULL DEFAULT 0 CHECK (round >= 0);
