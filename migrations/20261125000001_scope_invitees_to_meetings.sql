-- Invitees belong to one meeting each. An invitee URI was unique across all users, so two app users
-- hosting one Calendly event (collective and round-robin events: each host's subscription receives
-- the same invitee), or an account that moved from one app user to another, took the row from each
-- other's meeting on every write. Now each meeting keeps its own invitee rows and a write for one
-- meeting never touches another's. Existing rows stay on the meeting they are on.
ALTER TABLE meeting_invitees DROP CONSTRAINT meeting_invitees_calendly_invitee_uri_key;
ALTER TABLE meeting_invitees
    ADD CONSTRAINT meeting_invitees_meeting_invitee_key UNIQUE (meeting_id, calendly_invitee_uri);
-- Lookups by invitee URI (reschedule links, data deletion) no longer have the old unique index.
CREATE INDEX meeting_invitees_uri_idx ON meeting_invitees (calendly_invitee_uri);
-- The new unique index leads with meeting_id and serves what this one did.
DROP INDEX meeting_invitees_meeting_idx;
