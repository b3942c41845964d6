//! `meetings` and `meeting_invitees`: upserts that tolerate duplicates and out-of-order deliveries.
//! What the rows say is decided in [`crate::meeting`]; this module only writes them.

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::connections::PROVIDER;
use crate::meeting::{Meeting, MeetingInvitee, MeetingStatus};

/// Inserts or updates `user_id`'s row for `meeting`; returns the meeting id.
pub async fn upsert_meeting(tx: &mut PgConnection, user_id: Uuid, meeting: &Meeting) -> sqlx::Result<Uuid> {
    let row: Option<(Uuid,)> = sqlx::query_as(
        "INSERT INTO meetings (id, user_id, provider, calendly_event_uri, name, status, start_time, end_time, \
             event_type_uri, location, canceled_at, cancel_reason, source_updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (user_id, calendly_event_uri) DO UPDATE SET \
             name = EXCLUDED.name, status = EXCLUDED.status, start_time = EXCLUDED.start_time, \
             end_time = EXCLUDED.end_time, event_type_uri = EXCLUDED.event_type_uri, location = EXCLUDED.location, \
             canceled_at = EXCLUDED.canceled_at, cancel_reason = EXCLUDED.cancel_reason, \
             source_updated_at = EXCLUDED.source_updated_at, updated_at = now() \
         -- Deliveries arrive out of order: an older snapshot of the event never overwrites a newer one.
         WHERE meetings.source_updated_at IS NULL OR meetings.source_updated_at <= EXCLUDED.source_updated_at \
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(user_id)
    .bind(PROVIDER)
    .bind(&meeting.calendly_event_uri)
    .bind(&meeting.name)
    .bind(meeting.status)
    .bind(meeting.start_time)
    .bind(meeting.end_time)
    .bind(&meeting.event_type_uri)
    .bind(&meeting.location)
    .bind(meeting.canceled_at)
    .bind(&meeting.cancel_reason)
    .bind(meeting.source_updated_at)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some((id,)) => Ok(id),
        // The guard kept a newer row: it still exists, so look its id up.
        None => {
            let (id,): (Uuid,) =
                sqlx::query_as("SELECT id FROM meetings WHERE user_id = $1 AND calendly_event_uri = $2")
                    .bind(user_id)
                    .bind(&meeting.calendly_event_uri)
                    .fetch_one(&mut *tx)
                    .await?;
            Ok(id)
        }
    }
}

/// Inserts or updates an invitee of `meeting_id`. The row is the meeting's own: the same Calendly
/// invitee on another user's copy of the event is another row, never moved here.
pub async fn upsert_invitee(tx: &mut PgConnection, meeting_id: Uuid, invitee: &MeetingInvitee) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO meeting_invitees (id, meeting_id, calendly_invitee_uri, email, name, status, rescheduled, \
             old_invitee_uri, new_invitee_uri, no_show, canceled_at, cancel_reason, canceled_by, canceler_type, \
             source_updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
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
    .bind(Uuid::new_v4())
    .bind(meeting_id)
    .bind(&invitee.calendly_invitee_uri)
    .bind(&invitee.email)
    .bind(&invitee.name)
    .bind(invitee.status)
    .bind(invitee.rescheduled)
    .bind(&invitee.old_invitee_uri)
    .bind(&invitee.new_invitee_uri)
    .bind(invitee.no_show)
    .bind(invitee.canceled_at)
    .bind(&invitee.cancel_reason)
    .bind(&invitee.canceled_by)
    .bind(&invitee.canceler_type)
    .bind(invitee.source_updated_at)
    .execute(&mut *tx)
    .await
    .map(|_| ())
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
