//! Sync passes: backfill, resync and reconciliation are one mechanism. A pass lists the
//! connection's scheduled events from the look-back window on, page by page, compares each with
//! the stored meeting (Calendly's `updated_at`, status, invitee counts) and fetches invitees only
//! for what differs: an unchanged account costs one list call per 100 events, and a booking,
//! cancel or change whose webhook never came is corrected.
//!
//! A pass is resumable: when its user's API budget runs out it stops at the page it reached and
//! queues the rest for after the window resets, so a large account on a small budget finishes.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;

use calsync_common::calendly::CalendlyError;
use calsync_common::calendly::types::ScheduledEvent;
use calsync_common::db::changes::{self, Cause};
use calsync_common::db::connections::{self, Connection, ConnectionStatus, SyncResult};
use calsync_common::db::inbox::InboxStatus;
use calsync_common::db::meetings::{self, Stored};
use calsync_common::meeting::{Meeting, MeetingInvitee, MeetingStatus};
use calsync_common::queue::message::{Incoming, SyncJob, SyncKind, SyncResume};

use crate::calendly_call::CalendlyCalls;
use crate::deps::Deps;
use crate::error::ProcessError;
use crate::outcome::{self, Outcome};
use crate::subscription_check;

/// Runs one job from `calsync.sync`.
pub async fn process_sync(deps: &Deps, delivery: &Incoming) -> Outcome {
    let job = match serde_json::from_slice::<SyncJob>(&delivery.body) {
        Ok(job) => job,
        Err(error) => return Outcome::Dead { reason: format!("not a sync job: {error}") },
    };
    let connection_id = job.connection_id;
    let outcome = match job.kind {
        SyncKind::CheckSubscription => match subscription_check::check(deps, connection_id).await {
            Ok(None) => Outcome::ack(InboxStatus::Processed),
            Ok(Some(resync)) => Outcome::Continue { job: resync, at_least: Duration::ZERO },
            // A check that can never succeed as things stand (a plan without webhooks, no callback
            // URL to point a replacement at) is said on the connection and tried again at the next
            // interval; a dead letter per connection per interval would bury the real ones.
            Err(ProcessError::Permanent(reason)) => {
                let reason = format!("subscription check: {reason}");
                tracing::warn!(%connection_id, %reason, "subscription check failed");
                let _ = connections::set_last_error(&deps.pool, connection_id, &reason).await;
                Outcome::ack(InboxStatus::Ignored)
            }
            Err(error) => outcome::decide(error, delivery.attempt, deps.max_attempts),
        },
        _ => match pass(deps, &job).await {
            Ok(Pass::Finished(counts)) => {
                tracing::info!(%connection_id, kind = job.kind.as_str(), listed = counts.listed, fetched = counts.fetched, corrected = counts.corrected, "sync pass finished");
                Outcome::ack(InboxStatus::Processed)
            }
            Ok(Pass::Paused { rest, wait }) => Outcome::Continue { job: rest, at_least: wait },
            Ok(Pass::NotActive) => {
                // A pass cut short by a disconnect or reauth does not stay "running" for the app.
                let _ = connections::sync_ended(&deps.pool, connection_id, SyncResult::Failed).await;
                Outcome::ack(InboxStatus::Ignored)
            }
            Err(error) => outcome::decide(error, delivery.attempt, deps.max_attempts),
        },
    };
    match &outcome {
        Outcome::Ack { status: InboxStatus::AwaitingReauth, note } => {
            tracing::warn!(%connection_id, reason = note.as_deref().unwrap_or(""), "sync skipped: connection needs reauth");
        }
        // Sync jobs have no inbox row: the connection's status shows why its sync stopped.
        Outcome::Dead { reason } => {
            let what = job.kind.as_str();
            let _ = connections::set_last_error(&deps.pool, connection_id, &format!("{what} failed: {reason}")).await;
            if job.kind != SyncKind::CheckSubscription {
                let _ = connections::sync_ended(&deps.pool, connection_id, SyncResult::Failed).await;
            }
        }
        _ => {}
    }
    outcome
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Events Calendly listed.
    listed: usize,
    /// Of those, events that differed from ours and were fetched in detail and written.
    fetched: usize,
    /// Meetings and invitees those writes changed.
    corrected: i64,
}

enum Pass {
    Finished(Counts),
    /// The user's budget ran out: `rest` continues from the page reached, after `wait`.
    Paused {
        rest: SyncJob,
        wait: Duration,
    },
    /// The connection is gone, not active, or changed hands meanwhile: nothing to do.
    NotActive,
}

async fn pass(Deps { pool, calls, sync_lookback, .. }: &Deps, job: &SyncJob) -> Result<Pass, ProcessError> {
    let Some(connection) = connections::find(pool, job.connection_id).await? else { return Ok(Pass::NotActive) };
    if connection.status != ConnectionStatus::Active {
        return Ok(Pass::NotActive);
    }
    let Some(user_uri) = connection.calendly_user_uri.clone() else { return Ok(Pass::NotActive) };
    let resume = job.resume.clone().unwrap_or(SyncResume { page_token: None, started_at: OffsetDateTime::now_utc() });
    let mut min_start = resume.started_at - *sync_lookback;
    if job.kind == SyncKind::Resync
        && let Some(verified) = connection.last_synced_at
    {
        // A resync covers everything since the last pass known to have finished.
        min_start = min_start.min(verified);
    }
    if job.resume.is_none() {
        connections::sync_started(pool, connection.id, job.kind.as_str(), resume.started_at).await?;
    }
    let mut page = resume.page_token.clone();
    let mut counts = Counts::default();
    loop {
        let paused = |page: Option<String>, error: ProcessError| match budget_wait(&error) {
            Some(wait) => {
                let resume = SyncResume { page_token: page, started_at: resume.started_at };
                Ok(Pass::Paused { rest: SyncJob { resume: Some(resume), ..job.clone() }, wait })
            }
            None => Err(error),
        };
        let listed = calls
            .call(&connection, |token| {
                let (user_uri, page) = (user_uri.clone(), page.clone());
                async move { calls.calendly().list_events(&user_uri, min_start, page.as_deref(), &token).await }
            })
            .await;
        let events = match listed {
            Ok(events) => events,
            Err(error) => return paused(page, error),
        };
        counts.listed += events.collection.len();
        let uris: Vec<String> = events.collection.iter().map(|e| e.uri.clone()).collect();
        let stored: HashMap<String, Stored> = meetings::stored_among(pool, connection.user_id, &uris)
            .await?
            .into_iter()
            .map(|s| (s.calendly_event_uri.clone(), s))
            .collect();
        let differing: Vec<&ScheduledEvent> =
            events.collection.iter().filter(|e| differs(e, stored.get(&e.uri))).collect();
        metrics::counter!("calsync_sync_events_total", "result" => "unchanged")
            .increment((events.collection.len() - differing.len()) as u64);
        for event in differing {
            match write_event(pool, calls, &connection, event).await {
                Ok(EventWrite::Stored { corrected }) => {
                    counts.fetched += 1;
                    counts.corrected += corrected;
                    metrics::counter!("calsync_sync_events_total", "result" => "fetched").increment(1);
                }
                Ok(EventWrite::Vanished) => {
                    metrics::counter!("calsync_sync_events_total", "result" => "vanished").increment(1);
                }
                Ok(EventWrite::ConnectionChanged) => return Ok(Pass::NotActive),
                // The page is redone whole: what it wrote so far now matches and costs nothing.
                Err(error) => return paused(page, error),
            }
        }
        match events.pagination.next_page_token {
            Some(next) => page = Some(next),
            None => break,
        }
    }
    connections::set_synced(pool, connection.id, resume.started_at).await?;
    Ok(Pass::Finished(counts))
}

/// How long until the user's budget allows another call, when that is why `error` happened.
fn budget_wait(error: &ProcessError) -> Option<Duration> {
    match error {
        ProcessError::Deferred { until, .. } => Some(*until),
        // A 429 from Calendly itself (its reset is the floor of the retry).
        ProcessError::Transient { at_least: Some(reset), .. } => Some(*reset),
        _ => None,
    }
}

/// Whether a listed event differs from what we hold (or we hold nothing): only then is it fetched.
fn differs(event: &ScheduledEvent, stored: Option<&Stored>) -> bool {
    let Some(stored) = stored else { return true };
    let newer = stored.source_updated_at.is_none_or(|ours| ours < event.updated_at);
    let status_differs = stored.status != MeetingStatus::from_calendly(&event.status);
    // An invitee joining or canceling a group event need not change the event's `updated_at`.
    let counts_differ =
        event.invitees_counter.is_some_and(|c| c.total != stored.invitees || c.active != stored.active_invitees);
    newer || status_differs || counts_differ
}

/// What became of one listed event.
enum EventWrite {
    /// Written; `corrected` meetings and invitees changed (0: it only looked different).
    Stored { corrected: i64 },
    /// Calendly no longer has it (deleted between the list and the fetch): skipped, not a
    /// failure of the whole pass.
    Vanished,
    /// The connection changed hands or was disconnected meanwhile: nothing written.
    ConnectionChanged,
}

/// Lists `event`'s invitees and writes the meeting with them.
async fn write_event(
    pool: &PgPool,
    calls: &CalendlyCalls,
    connection: &Connection,
    event: &ScheduledEvent,
) -> Result<EventWrite, ProcessError> {
    let mut invitees = Vec::new();
    let mut invitee_page: Option<String> = None;
    loop {
        let batch = calls
            .call(connection, |token| {
                let page = invitee_page.clone();
                async move {
                    match calls.calendly().list_invitees(&event.uri, page.as_deref(), &token).await {
                        Ok(batch) => Ok(Some(batch)),
                        Err(CalendlyError::NotFound) => Ok(None),
                        Err(other) => Err(other),
                    }
                }
            })
            .await?;
        let Some(batch) = batch else {
            tracing::info!(event = %event.uri, "a listed event is gone at Calendly; skipped");
            return Ok(EventWrite::Vanished);
        };
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
    let mut tx = changes::begin(pool, Cause::Sync).await?;
    if !connections::lock_if_linked_to_update(&mut tx, connection).await? {
        return Ok(EventWrite::ConnectionChanged);
    }
    let meeting_id = meetings::upsert_meeting(&mut tx, connection.user_id, &Meeting::from_event(event)).await?;
    let invitees: Vec<_> = rows.iter().map(|row| (meeting_id, row)).collect();
    meetings::upsert_invitees(&mut tx, &invitees).await?;
    // What the change feed recorded for this write is exactly what the pass corrected.
    let corrected = changes::meeting_changes_in_transaction(&mut tx).await?;
    if corrected > 0 {
        connections::add_corrected(&mut tx, connection.id, corrected).await?;
    }
    tx.commit().await?;
    metrics::counter!("calsync_sync_corrected_total").increment(corrected as u64);
    Ok(EventWrite::Stored { corrected })
}

#[cfg(test)]
mod tests {
    use calsync_common::calendly::types::InviteesCounter;

    use super::*;

    fn event(updated_at: OffsetDateTime, status: &str, total: i64, active: i64) -> ScheduledEvent {
        serde_json::from_value::<ScheduledEvent>(serde_json::json!({
            "uri": "https://api.calendly.com/scheduled_events/E",
            "status": status,
            "start_time": "2026-12-01T10:00:00Z",
            "end_time": "2026-12-01T10:30:00Z",
            "updated_at": updated_at.format(&time::format_description::well_known::Rfc3339).unwrap(),
        }))
        .map(|e| ScheduledEvent { invitees_counter: Some(InviteesCounter { total, active }), ..e })
        .unwrap()
    }

    fn stored(updated_at: OffsetDateTime, status: MeetingStatus, invitees: i64, active: i64) -> Stored {
        Stored {
            calendly_event_uri: "https://api.calendly.com/scheduled_events/E".into(),
            status,
            source_updated_at: Some(updated_at),
            invitees,
            active_invitees: active,
        }
    }

    #[test]
    fn an_event_we_hold_as_calendly_lists_it_is_not_fetched_again() {
        let t = OffsetDateTime::now_utc();
        assert!(!differs(&event(t, "active", 2, 2), Some(&stored(t, MeetingStatus::Active, 2, 2))));
    }

    #[test]
    fn a_missing_newer_canceled_or_recounted_event_is_fetched() {
        let t = OffsetDateTime::now_utc();
        let ours = stored(t, MeetingStatus::Active, 2, 2);
        assert!(differs(&event(t, "active", 2, 2), None), "never seen");
        assert!(differs(&event(t + time::Duration::seconds(1), "active", 2, 2), Some(&ours)), "changed since");
        assert!(differs(&event(t, "canceled", 2, 2), Some(&ours)), "canceled without a newer stamp");
        assert!(differs(&event(t, "active", 2, 1), Some(&ours)), "one invitee canceled");
        assert!(differs(&event(t, "active", 3, 3), Some(&ours)), "one invitee joined");
    }
}
