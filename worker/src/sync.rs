//! Backfill: a connection's scheduled events (with invitees) from the look-back window forward,
//! paginated, under the same token and rate-limit rules as webhooks.

use time::OffsetDateTime;
use uuid::Uuid;

use calsync_common::db::connections::{self, ConnectionStatus};
use calsync_common::db::inbox::InboxStatus;
use calsync_common::db::meetings;
use calsync_common::meeting::{Meeting, MeetingInvitee};
use calsync_common::queue::message::{Incoming, SyncJob};

use crate::calendly_call;
use crate::deps::Deps;
use crate::error::ProcessError;
use crate::outcome::{self, Outcome};

/// Runs one backfill job delivery.
pub async fn process_sync(deps: &Deps, delivery: &Incoming) -> Outcome {
    let job = match serde_json::from_slice::<SyncJob>(&delivery.body) {
        Ok(job) => job,
        Err(error) => return Outcome::Dead { reason: format!("not a sync job: {error}") },
    };
    let connection_id = job.connection_id;
    let outcome = match backfill(deps, connection_id).await {
        Ok(Some(events)) => {
            tracing::info!(%connection_id, events, "backfill finished");
            Outcome::ack(InboxStatus::Processed)
        }
        Ok(None) => Outcome::ack(InboxStatus::Ignored),
        Err(error) => outcome::decide(error, delivery.attempt, deps.max_attempts),
    };
    match &outcome {
        Outcome::Ack { status: InboxStatus::AwaitingReauth, note } => {
            tracing::warn!(%connection_id, reason = note.as_deref().unwrap_or(""), "backfill skipped: connection needs reauth");
        }
        // Sync jobs have no inbox row: the connection's status shows why its backfill stopped.
        Outcome::Dead { reason } => {
            let _ = connections::set_last_error(&deps.pool, connection_id, &format!("backfill failed: {reason}")).await;
        }
        _ => {}
    }
    outcome
}

/// Returns the number of events written, or `None` when the connection is gone or not active.
async fn backfill(deps: &Deps, connection_id: Uuid) -> Result<Option<usize>, ProcessError> {
    let Some(connection) = connections::find(&deps.pool, connection_id).await? else { return Ok(None) };
    if connection.status != ConnectionStatus::Active {
        return Ok(None);
    }
    let Some(user_uri) = connection.calendly_user_uri.clone() else { return Ok(None) };
    let started = OffsetDateTime::now_utc();
    let min_start = started - deps.sync_lookback;
    let mut written = 0;
    let mut page: Option<String> = None;
    loop {
        let events = calendly_call::call(deps, &connection, |token| {
            let (user_uri, page) = (user_uri.clone(), page.clone());
            async move { deps.calendly.list_events(&user_uri, min_start, page.as_deref(), &token).await }
        })
        .await?;
        for event in &events.collection {
            let mut invitees = Vec::new();
            let mut invitee_page: Option<String> = None;
            loop {
                let batch = calendly_call::call(deps, &connection, |token| {
                    let page = invitee_page.clone();
                    async move { deps.calendly.list_invitees(&event.uri, page.as_deref(), &token).await }
                })
                .await?;
                invitees.extend(batch.collection);
                match batch.pagination.next_page_token {
                    Some(t) => invitee_page = Some(t),
                    None => break,
                }
            }
            let rows = invitees
                .iter()
                .map(|invitee| MeetingInvitee::of_event(event, invitee))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ProcessError::Permanent(format!("Calendly listed {e}")))?;
            let mut tx = deps.pool.begin().await?;
            if !connections::lock_if_linked(&mut tx, &connection).await? {
                return Ok(None);
            }
            let meeting_id = meetings::upsert_meeting(&mut tx, connection.user_id, &Meeting::from_event(event)).await?;
            for row in &rows {
                meetings::upsert_invitee(&mut tx, meeting_id, row).await?;
            }
            tx.commit().await?;
            written += 1;
        }
        match events.pagination.next_page_token {
            Some(t) => page = Some(t),
            None => break,
        }
    }
    connections::set_synced(&deps.pool, connection_id, started).await?;
    Ok(Some(written))
}
