-- The change feed (ARCHITECTURE.md, "Telling the app what changed"): one row per effective change of
-- a meeting, an invitee or a connection, written by triggers in the transaction that makes the
-- change, so no write path can forget it and a write that changes nothing records nothing.
--
-- `position` is NULL until the sequencer (calsync_common::changes::feed) numbers the row; `seq`
-- only orders rows the sequencer numbers in one go (see there for why readers never use it).
CREATE TABLE change_log (
    change_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq                bigint GENERATED ALWAYS AS IDENTITY,
    position           bigint,
    user_id            uuid NOT NULL,
    kind               text NOT NULL,
    meeting_id         uuid,
    calendly_event_uri text,
    invitee_id         uuid,
    connection_id      uuid,
    status             text,
    reason             text,
    cause              text NOT NULL,
    occurred_at        timestamptz NOT NULL DEFAULT now()
);
-- Partial indexes: a row enters the position indexes once, when it is numbered, not also at insert
-- (the insert is on the drain's hot path).
CREATE UNIQUE INDEX change_log_position ON change_log (position) WHERE position IS NOT NULL;
CREATE INDEX change_log_user_position ON change_log (user_id, position) WHERE position IS NOT NULL;
CREATE INDEX change_log_unpositioned ON change_log (seq) WHERE position IS NULL;

-- The feed's bookkeeping, one row: the highest position handed out, the highest one pruned by
-- retention (an older cursor is expired), and the highest one the push side has published.
CREATE TABLE change_feed (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_position      bigint NOT NULL DEFAULT 0,
    pruned_through     bigint NOT NULL DEFAULT 0,
    published_through  bigint NOT NULL DEFAULT 0
);
INSERT INTO change_feed DEFAULT VALUES;

-- Why a connection needs reauth, as a code (`invalid_grant`, `insufficient_scope`, `integrity`);
-- meaningful while status = 'needs_reauth'. `last_error` keeps the readable text.
ALTER TABLE calendar_connections ADD COLUMN reauth_reason text;

-- The last sync pass (backfill, resync or reconciliation), for the app's "last synced".
ALTER TABLE calendar_connections
    ADD COLUMN sync_kind text,
    ADD COLUMN sync_started_at timestamptz,
    ADD COLUMN sync_finished_at timestamptz,
    ADD COLUMN sync_result text CHECK (sync_result IN ('running', 'done', 'failed')),
    ADD COLUMN sync_corrected integer NOT NULL DEFAULT 0;

-- What caused the change: set per transaction by calsync (`SET LOCAL calsync.cause`); a change made
-- by hand, outside calsync, is an operator's.
CREATE FUNCTION change_cause() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT coalesce(nullif(current_setting('calsync.cause', true), ''), 'operator') $$;

-- The insert of the connection trigger below (one row at a time: connections change rarely).
CREATE FUNCTION record_change(owner uuid, kind text, meeting uuid, event_uri text, invitee uuid, connection uuid,
                              status text, reason text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO change_log (user_id, kind, meeting_id, calendly_event_uri, invitee_id, connection_id, status, reason, cause)
    VALUES (owner, kind, meeting, event_uri, invitee, connection, status, reason, change_cause())
$$;

-- Meetings and invitees are written in batches (one statement for many rows): their triggers are
-- per statement, reading the statement's transition tables, so a batch records its changes with one
-- INSERT instead of one trigger call per row.
CREATE FUNCTION record_meetings_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO change_log (user_id, kind, meeting_id, calendly_event_uri, status, cause)
    SELECT n.user_id, 'meeting.created', n.id, n.calendly_event_uri, n.status, change_cause() FROM new_rows n;
    RETURN NULL;
END $$;

CREATE FUNCTION record_meetings_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Only what the app shows: a fresh copy of the same content, or a newer `updated_at` alone, is
    -- not a change.
    INSERT INTO change_log (user_id, kind, meeting_id, calendly_event_uri, status, cause)
    SELECT n.user_id,
           CASE WHEN n.status = 'canceled' AND o.status IS DISTINCT FROM 'canceled' THEN 'meeting.canceled'
                ELSE 'meeting.updated' END,
           n.id, n.calendly_event_uri, n.status, change_cause()
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE (o.status, o.start_time, o.end_time, o.name, o.location, o.event_type_uri)
          IS DISTINCT FROM (n.status, n.start_time, n.end_time, n.name, n.location, n.event_type_uri);
    RETURN NULL;
END $$;

CREATE TRIGGER meetings_created AFTER INSERT ON meetings REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION record_meetings_created();
CREATE TRIGGER meetings_changed AFTER UPDATE ON meetings REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION record_meetings_changed();

CREATE FUNCTION record_invitees_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO change_log (user_id, kind, meeting_id, calendly_event_uri, invitee_id, status, cause)
    SELECT m.user_id, 'invitee.created', n.meeting_id, m.calendly_event_uri, n.id, n.status, change_cause()
    FROM new_rows n JOIN meetings m ON m.id = n.meeting_id;
    RETURN NULL;
END $$;

CREATE FUNCTION record_invitees_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO change_log (user_id, kind, meeting_id, calendly_event_uri, invitee_id, status, cause)
    SELECT m.user_id, c.kind, n.meeting_id, m.calendly_event_uri, n.id, c.status, change_cause()
    FROM new_rows n
    JOIN old_rows o ON o.id = n.id
    JOIN meetings m ON m.id = n.meeting_id
    CROSS JOIN LATERAL (VALUES
        -- Canceled; or active again after a cancel (Calendly sent both states with one
        -- `updated_at`): for the app the invitee is booked again.
        (1, CASE WHEN n.status = 'canceled' THEN 'invitee.canceled' ELSE 'invitee.created' END, n.status,
         o.status IS DISTINCT FROM n.status),
        (2, 'invitee.no_show_changed', CASE WHEN n.no_show THEN 'no_show' ELSE 'showed' END,
         o.no_show IS DISTINCT FROM n.no_show)
    ) AS c(part, kind, status, changed)
    WHERE c.changed
    ORDER BY n.id, c.part;
    RETURN NULL;
END $$;

CREATE TRIGGER invitees_created AFTER INSERT ON meeting_invitees REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION record_invitees_created();
CREATE TRIGGER invitees_changed AFTER UPDATE ON meeting_invitees REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION record_invitees_changed();

CREATE FUNCTION record_connection_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was text := CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.status END;
    was_linked_to text := CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.calendly_user_uri END;
    sub_was text := CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.subscription_state END;
    kind text;
BEGIN
    -- Connected, reconnected (also to another Calendly account), or back from needs_reauth.
    IF NEW.status = 'active' AND (was IS DISTINCT FROM 'active' OR was_linked_to IS DISTINCT FROM NEW.calendly_user_uri) THEN
        PERFORM record_change(NEW.user_id, 'connection.active', NULL, NULL, NULL, NEW.id, NEW.status, NULL);
    ELSIF NEW.status = 'needs_reauth' AND was IS DISTINCT FROM 'needs_reauth' THEN
        PERFORM record_change(NEW.user_id, 'connection.needs_reauth', NULL, NULL, NULL, NEW.id, NEW.status, NEW.reauth_reason);
    ELSIF NEW.status = 'disconnected' AND was IS DISTINCT FROM 'disconnected' THEN
        PERFORM record_change(NEW.user_id, 'connection.disconnected', NULL, NULL, NULL, NEW.id, NEW.status, NULL);
    END IF;
    -- The subscription: only a move between states a check found (NULL = none made or checked yet).
    IF sub_was IS NOT NULL AND NEW.subscription_state IS NOT NULL AND sub_was <> NEW.subscription_state THEN
        kind := CASE WHEN NEW.subscription_state = 'active' THEN 'connection.subscription_repaired'
                     ELSE 'connection.subscription_failing' END;
        PERFORM record_change(NEW.user_id, kind, NULL, NULL, NULL, NEW.id, NEW.subscription_state, NULL);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER connections_created AFTER INSERT ON calendar_connections
    FOR EACH ROW EXECUTE FUNCTION record_connection_change();
CREATE TRIGGER connections_changed AFTER UPDATE ON calendar_connections
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.calendly_user_uri IS DISTINCT FROM NEW.calendly_user_uri
          OR OLD.subscription_state IS DISTINCT FROM NEW.subscription_state)
    EXECUTE FUNCTION record_connection_change();
