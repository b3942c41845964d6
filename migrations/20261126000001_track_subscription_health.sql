-- What the last subscription check found (NULL: never checked, or this connection has no
-- subscription because calsync creates none). `failing` = Calendly is retrying deliveries to it
-- right now (`retry_started_at`, kept in subscription_failing_since): the only warning before
-- Calendly disables it.
ALTER TABLE calendar_connections
    ADD COLUMN subscription_state text
        CHECK (subscription_state IN ('active', 'failing', 'disabled', 'missing')),
    ADD COLUMN subscription_failing_since timestamptz,
    ADD COLUMN subscription_checked_at timestamptz;
