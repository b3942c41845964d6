//! `meetings` and `meeting_invitees`: upserts that tolerate duplicates and out-of-order deliveries.
//! What the rows say is decided in [`crate::meeting`]; this module only writes them.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::connections::PROVIDER;
use crate::db::rounds;
use crate::meeting::{Meeting, MeetingInvitee, MeetingStatus};

/// A meeting's key: its user and Calendly event.
pub type MeetingKey = (Uuid, String);

/// Inserts or updates each user's row for each meeting, in order; returns every meeting's id.
pub async fn upsert_meetings(
    tx: &mut PgConnection,
    meetings: &[(Uuid, &Meeting)],
) -> sqlx::Result<HashMap<MeetingKey, Uuid>> {
    // An occurrence identical to its key's previous one writes nothing: the row holds that
    // snapshot by then, or a newer one the guard keeps. Every invitee of a group event carries the
    // same snapshot, so a batch holding several of them would otherwise spend a statement (a
    // round) on each extra one.
    let mut previous: HashMap<MeetingKey, &Meeting> = HashMap::new();
    let distinct: Vec<(Uuid, &Meeting)> = meetings
        .iter()
        .filter(|(user, m)| previous.insert((*user, m.calendly_event_uri.clone()), m).is_none_or(|p| p != *m))
        .copied()
        .collect();
    let mut ids = HashMap::new();
    for round in rounds(distinct, |(user, m)| (*user, m.calendly_event_uri.clone())) {
        let returned: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "INSERT INTO meetings (id, user_id, calendly_event_uri, name, status, start_time, end_time, \
                 event_type_uri, location, canceled_at, cancel_reason, source_updated_at, provider) \
             SELECT *, $13::text FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
                 $6::timestamptz[], $7::timestamptz[], $8::text[], $9::jsonb[], $10::timestamptz[], $11::text[], \
                 $12::timestamptz[]) \
             ON CONFLICT (user_id, calendly_event_uri) DO UPDATE SET \
                 name = EXCLUDED.name, status = EXCLUDED.status, start_time = EXCLUDED.start_time, \
                 end_time = EXCLUDED.end_time, event_type_uri = EXCLUDED.event_type_uri, location = EXCLUDED.location, \
                 canceled_at = EXCLUDED.canceled_at, cancel_reason = EXCLUDED.cancel_reason, \
                 source_updated_at = EXCLUDED.source_updated_at, updated_at = now() \
             -- Deliveries arrive out of order: an older snapshot of the event never overwrites a newer one.
             -- The same snapshot again (every invitee of a group event carries it) writes nothing: no
             -- dead row version, and nothing for the change feed to compare.
             WHERE (meetings.source_updated_at IS NULL OR meetings.source_updated_at <= EXCLUDED.source_updated_at) \
               AND (meetings.name, meetings.status, meetings.start_time, meetings.end_time, meetings.event_type_uri, \
                    meetings.location, meetings.canceled_at, meetings.cancel_reason, meetings.source_updated_at) \
                   IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.status, EXCLUDED.start_time, EXCLUDED.end_time, \
                    EXCLUDED.event_type_uri, EXCLUDED.location, EXCLUDED.canceled_at, EXCLUDED.cancel_reason, \
                    EXCLUDED.source_updated_at) \
             RETURNING id, user_id, calendly_event_uri",
        )
        .bind(round.iter().map(|_| Uuid::new_v4()).collect::<Vec<_>>())
        .bind(round.iter().map(|(user, _)| *user).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.calendly_event_uri.as_str()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.name.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.status.as_str()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.start_time).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.end_time).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.event_type_uri.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.location.clone()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.canceled_at).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.cancel_reason.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, m)| m.source_updated_at).collect::<Vec<_>>())
        .bind(PROVIDER)
        .fetch_all(&mut *tx)
        .await?;
        ids.extend(returned.into_iter().map(|(id, user, uri)| ((user, uri), id)));
    }
    // The guard kept a newer row for some: they exist, so look their ids up.
    let missing: Vec<&(Uuid, &Meeting)> =
        meetings.iter().filter(|(user, m)| !ids.contains_key(&(*user, m.calendly_event_uri.clone()))).collect();
    if !missing.is_empty() {
        let found: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "SELECT m.id, m.user_id, m.calendly_event_uri FROM meetings m \
             JOIN UNNEST($1::uuid[], $2::text[]) AS k(user_id, uri) \
               ON m.user_id = k.user_id AND m.calendly_event_uri = k.uri",
        )
        .bind(missing.iter().map(|(user, _)| *user).collect::<Vec<_>>())
        .bind(missing.iter().map(|(_, m)| m.calendly_event_uri.as_str()).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        ids.extend(found.into_iter().map(|(id, user, uri)| ((user, uri), id)));
    }
    Ok(ids)
}

/// Inserts or updates `user_id`'s row for `meeting`; returns the meeting id.
pub async fn upsert_meeting(tx: &mut PgConnection, user_id: Uuid, meeting: &Meeting) -> sqlx::Result<Uuid> {
    let ids = upsert_meetings(tx, &[(user_id, meeting)]).await?;
    ids.get(&(user_id, meeting.calendly_event_uri.clone())).copied().ok_or(sqlx::Error::RowNotFound)
}

/// Inserts or updates invitees, each of the meeting it is paired with, in order. The row is the
/// meeting's own: the same Calendly invitee on another user's copy of the event is another row,
/// never moved here.
pub async fn upsert_invitees(tx: &mut PgConnection, invitees: &[(Uuid, &MeetingInvitee)]) -> sqlx::Result<()> {
    for round in rounds(invitees.to_vec(), |(meeting, i)| (*meeting, i.calendly_invitee_uri.clone())) {
        sqlx::query(
            "WITH k AS ( \
                 SELECT k.*, f.email_hash IS NOT NULL AS erased \
                 FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], \
                     $7::bool[], $8::text[], $9::text[], $10::bool[], $11::timestamptz[], $12::text[], $13::text[], \
                     $14::text[], $15::timestamptz[]) \
                     AS k(id, meeting_id, uri, email, name, status, rescheduled, old_uri, new_uri, no_show, \
                          canceled_at, cancel_reason, canceled_by, canceler_type, source_updated_at) \
                 LEFT JOIN forgotten_people f ON f.email_hash = CASE \
                     WHEN starts_with(k.email, 'forgotten:') THEN substr(k.email, 11) \
                     ELSE encode(sha256(convert_to(lower(k.email), 'UTF8')), 'hex') END \
             ), \
             -- A person erased by `forget` stays erased (db::forgotten; a rewritten body carries the
             -- marker 'forgotten:<hash>' instead of the email): neither their name and email, nor a
             -- location they gave (their phone, what they typed), nor a cancel reason they wrote.
             erased_from_meetings AS ( \
                 UPDATE meetings m SET \
                     location = CASE WHEN m.location->>'type' IN ('outbound_call', 'ask_invitee') \
                                     THEN NULL ELSE m.location END, \
                     cancel_reason = CASE WHEN k.canceler_type = 'invitee' THEN NULL ELSE m.cancel_reason END \
                 FROM k \
                 WHERE k.erased AND m.id = k.meeting_id \
                   AND (m.location->>'type' IN ('outbound_call', 'ask_invitee') \
                        OR (k.canceler_type = 'invitee' AND m.cancel_reason IS NOT NULL)) \
             ) \
             INSERT INTO meeting_invitees (id, meeting_id, calendly_invitee_uri, email, name, status, rescheduled, \
                 old_invitee_uri, new_invitee_uri, no_show, canceled_at, cancel_reason, canceled_by, canceler_type, \
                 source_updated_at) \
             SELECT id, meeting_id, uri, CASE WHEN erased THEN NULL ELSE email END, \
                 CASE WHEN erased THEN NULL ELSE name END, status, rescheduled, old_uri, new_uri, no_show, \
                 canceled_at, CASE WHEN erased THEN NULL ELSE cancel_reason END, \
                 CASE WHEN erased THEN NULL ELSE canceled_by END, canceler_type, source_updated_at FROM k \
             ON CONFLICT (meeting_id, calendly_invitee_uri) DO UPDATE SET \
                 email = EXCLUDED.email, name = EXCLUDED.name, \
                 status = EXCLUDED.status, rescheduled = EXCLUDED.rescheduled, \
                 old_invitee_uri = COALESCE(EXCLUDED.old_invitee_uri, meeting_invitees.old_invitee_uri), \
                 new_invitee_uri = COALESCE(EXCLUDED.new_invitee_uri, meeting_invitees.new_invitee_uri), \
                 no_show = EXCLUDED.no_show, canceled_at = EXCLUDED.canceled_at, \
                 cancel_reason = EXCLUDED.cancel_reason, canceled_by = EXCLUDED.canceled_by, \
                 canceler_type = EXCLUDED.canceler_type, source_updated_at = EXCLUDED.source_updated_at, \
                 updated_at = now() \
             -- An older delivery (e.g. invitee.created after invitee.canceled) never undoes a newer state.
             WHERE meeting_invitees.source_updated_at IS NULL OR meeting_invitees.source_updated_at <= EXCLUDED.source_updated_at",
        )
        .bind(round.iter().map(|_| Uuid::new_v4()).collect::<Vec<_>>())
        .bind(round.iter().map(|(meeting, _)| *meeting).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.calendly_invitee_uri.as_str()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.email.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.name.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.status.as_str()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.rescheduled).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.old_invitee_uri.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.new_invitee_uri.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.no_show).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.canceled_at).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.cancel_reason.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.canceled_by.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.canceler_type.as_deref()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, i)| i.source_updated_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// What we hold of one meeting, in the terms Calendly's event list can be compared with.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Stored {
    pub calendly_event_uri: String,
    pub status: MeetingStatus,
    pub source_updated_at: Option<OffsetDateTime>,
    /// Invitee rows, and those of them still active.
    pub invitees: i64,
    pub active_invitees: i64,
}

/// `user_id`'s stored meetings among `event_uris` (one round trip per listed page).
pub async fn stored_among(pool: &PgPool, user_id: Uuid, event_uris: &[String]) -> sqlx::Result<Vec<Stored>> {
    sqlx::query_as(
        "SELECT m.calendly_event_uri, m.status, m.source_updated_at, count(i.id) AS invitees, \
             count(i.id) FILTER (WHERE i.status = $3) AS active_invitees \
         FROM meetings m LEFT JOIN meeting_invitees i ON i.meeting_id = m.id \
         WHERE m.user_id = $1 AND m.calendly_event_uri = ANY($2) GROUP BY m.id",
    )
    .bind(user_id)
    .bind(event_uris)
    .bind(MeetingStatus::Active)
    .fetch_all(pool)
    .await
}
