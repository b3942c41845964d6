-- calsync schema. ARCHITECTURE.md "Database" is the contract for every name here.

CREATE TABLE calendar_connections (
    id                        uuid PRIMARY KEY,
    user_id                   uuid        NOT NULL,
    provider                  text        NOT NULL DEFAULT 'calendly',
    calendly_user_uri         text,
    calendly_organization_uri text,
    -- AES-256-GCM ciphertext bound to (row id, column) through associated data; never plaintext.
    access_token              text,
    refresh_token             text,
    token_expires_at          timestamptz,
    is_active                 boolean     NOT NULL DEFAULT false,
    status                    text        NOT NULL DEFAULT 'disconnected'
        CHECK (status IN ('active', 'needs_reauth', 'disconnected')),
    webhook_subscription_uri  text,
    last_synced_at            timestamptz,
    last_error                text,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    -- is_active mirrors status so the uniqueness rule below can be a plain partial index.
    CONSTRAINT calendar_connections_active_matches_status
        CHECK (is_active = (status IN ('active', 'needs_reauth')))
);

CREATE UNIQUE INDEX calendar_connections_provider_user_key
    ON calendar_connections (provider, user_id);

-- One Calendly account belongs to at most one app user at a time: this is what stops a second user
-- from "connecting" someone else's Calendly account and receiving their meetings.
CREATE UNIQUE INDEX calendar_connections_active_calendly_user_key
    ON calendar_connections (provider, calendly_user_uri)
    WHERE is_active;

CREATE TABLE meetings (
    id                 uuid PRIMARY KEY,
    user_id            uuid        NOT NULL,
    provider           text        NOT NULL DEFAULT 'calendly',
    calendly_event_uri text        NOT NULL,
    name               text,
    status             text        NOT NULL CHECK (status IN ('active', 'canceled')),
    start_time         timestamptz,
    end_time           timestamptz,
    event_type_uri     text,
    location           jsonb,
    canceled_at        timestamptz,
    cancel_reason      text,
    source_updated_at  timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT meetings_user_event_key UNIQUE (user_id, calendly_event_uri)
);

CREATE INDEX meetings_user_start_idx ON meetings (user_id, start_time);

CREATE TABLE meeting_invitees (
    id                   uuid PRIMARY KEY,
    meeting_id           uuid        NOT NULL REFERENCES meetings (id) ON DELETE CASCADE,
    calendly_invitee_uri text        NOT NULL UNIQUE,
    email                text,
    name                 text,
    status               text        NOT NULL CHECK (status IN ('active', 'canceled')),
    rescheduled          boolean     NOT NULL DEFAULT false,
    old_invitee_uri      text,
    new_invitee_uri      text,
    no_show              boolean     NOT NULL DEFAULT false,
    canceled_at          timestamptz,
    cancel_reason        text,
    canceled_by          text,
    canceler_type        text,
    source_updated_at    timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX meeting_invitees_meeting_idx ON meeting_invitees (meeting_id);

CREATE TABLE webhook_inbox (
    message_id   text PRIMARY KEY,
    event        text,
    created_by   text,
    received_at  timestamptz NOT NULL DEFAULT now(),
    status       text        NOT NULL
        CHECK (status IN ('processed', 'ignored', 'unmatched', 'awaiting_reauth', 'dead')),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    processed_at timestamptz,
    -- Kept only while the delivery may be replayed (unmatched, awaiting_reauth); NULL otherwise.
    body         bytea
);

-- Replay looks parked deliveries up by the Calendly user they were addressed to.
CREATE INDEX webhook_inbox_parked_idx ON webhook_inbox (created_by, received_at)
    WHERE status IN ('unmatched', 'awaiting_reauth');

CREATE TABLE oauth_states (
    state_hash    text PRIMARY KEY,
    user_id       uuid        NOT NULL,
    code_verifier text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);
