-- People erased by `calsync-worker forget <email>`: a tombstone (the SHA-256 of the lowercased email,
-- never the email itself) that later writes honour, so a replayed dead letter, a retried delivery
-- or a sync pass cannot write an erased invitee's name and email back.
CREATE TABLE forgotten_people (
    email_hash   text PRIMARY KEY,
    forgotten_at timestamptz NOT NULL DEFAULT now()
);
