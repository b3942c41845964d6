//! `meetings` and `meeting_invitees`: upserts that tolerate duplicates and out-of-order deliveries.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::calendly::types::{Invitee, ScheduledEvent};
use crate::db::connections::PROVIDER;

/// Inserts or updates `user_id`'s meeting for `event`; returns the meeting id.
pub async fn upsert_meeting(tx: &mut PgConnection, user_id: Uuid, event: &ScheduledEvent) -> sqlx::Result<Uuid> {
    let cancellation = event.cancellation.as_ref();
    let canceled_at = if event.status == "canceled" {
        cancellation.and_then(|c| c.created_at).or(Some(event.updated_at))
    } else {
        None
    };
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
    .bind(&event.uri)
    .bind(&event.name)
    .bind(normalise_status(&event.status))
    .bind(event.start_time)
    .bind(event.end_time)
    .bind(&event.event_type)
    .bind(&event.location)
    .bind(canceled_at)
    .bind(cancellation.and_then(|c| c.reason.clone()))
    .bind(event.updated_at)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some((id,)) => Ok(id),
        // The guard kept a newer row: it still exists, so look its id up.
        None => {
            let (id,): (Uuid,) =
                sqlx::query_as("SELECT id FROM meetings WHERE user_id = $1 AND calendly_event_uri = $2")
                    .bind(user_id)
                    .bind(&event.uri)
                    .fetch_one(&mut *tx)
                    .await?;
            Ok(id)
        }
    }
}

/// Inserts or updates an invitee of `meeting_id`.
pub async fn upsert_invitee(tx: &mut PgConnection, meeting_id: Uuid, invitee: &Invitee) -> sqlx::Result<()> {
    let cancellation = invitee.cancellation.as_ref();
    let canceled_at = if invitee.status == "canceled" {
        cancellation.and_then(|c| c.created_at).or(Some(invitee.updated_at))
    } else {
        None
    };
    sqlx::query(
        "INSERT INTO meeting_invitees (id, meeting_id, calendly_invitee_uri, email, name, status, rescheduled, \
             old_invitee_uri, new_invitee_uri, no_show, canceled_at, cancel_reason, canceled_by, canceler_type, \
             source_updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (calendly_invitee_uri) DO UPDATE SET \
             meeting_id = EXCLUDED.meeting_id, email = EXCLUDED.email, name = EXCLUDED.name, \
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
    .bind(&invitee.uri)
    .bind(&invitee.email)
    .bind(&invitee.name)
    .bind(normalise_status(&invitee.status))
    .bind(invitee.rescheduled.unwrap_or(false))
    .bind(&invitee.old_invitee)
    .bind(&invitee.new_invitee)
    .bind(invitee.no_show.as_ref().is_some_and(|v| !v.is_null()))
    .bind(canceled_at)
    .bind(cancellation.and_then(|c| c.reason.clone()))
    .bind(cancellation.and_then(|c| c.canceled_by.clone()))
    .bind(cancellation.and_then(|c| c.canceler_type.clone()))
    .bind(invitee.updated_at)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

/// Our columns only know `active` and `canceled`.
fn normalise_status(status: &str) -> &'static str {
    if status == "canceled" { "canceled" } else { "active" }
}
