-- The two-phase connect: the OAuth callback stores what Calendly granted here, not as a connection.
-- Only the app, which knows which of its users the browser is logged in as, turns a pending result
-- into a connection (POST /connections/calendly/{user_id}/confirm), and only for the user who asked
-- for the link. A forwarded link therefore can never attach someone else's Calendly account.
CREATE TABLE pending_connections (
    -- SHA-256 of the one-time connect_id handed to the browser; the id itself is never stored.
    connect_id_hash           text PRIMARY KEY,
    -- The app user who asked for the authorize link.
    user_id                   uuid        NOT NULL,
    calendly_user_uri         text        NOT NULL,
    calendly_organization_uri text        NOT NULL,
    calendly_name             text,
    calendly_email            text,
    -- AES-256-GCM ciphertext bound to this row and column, like calendar_connections' tokens.
    access_token              text        NOT NULL,
    refresh_token             text        NOT NULL,
    token_expires_at          timestamptz NOT NULL,
    -- Ten minutes after the callback; expired rows are deleted and their tokens revoked.
    expires_at                timestamptz NOT NULL,
    created_at                timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX pending_connections_expiry_idx ON pending_connections (expires_at);
