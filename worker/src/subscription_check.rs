//! Subscription health. Calendly retries a failing delivery for 24 hours, then silently disables
//! the subscription; nothing tells us. So each connection's subscription is read from Calendly
//! periodically: `failing` (Calendly is retrying) is recorded with since when, and a `disabled` or
//! vanished one is replaced — the new one first, so there is never a moment with none, then the old
//! one deleted — and the connection resynced, which brings back what was missed meanwhile.
//!
//! Each check also replays parked deliveries still addressed to the active connection (see
//! `catch_up_parked`).
//!
//! Every Calendly call here is auxiliary: a grant without `webhooks:read` (made before calsync
//! asked for it) is reported on the connection, never parked as `needs_reauth`.

use sqlx::PgPool;

use calsync_common::calendly::CalendlyError;
use calsync_common::calendly::subscription::{self, SubscriptionError};
use calsync_common::calendly::types::Subscription;
use calsync_common::db::connections::{self, Connection, ConnectionStatus, SubscriptionState};
use calsync_common::queue::Broker;
use calsync_common::queue::message::{SyncJob, SyncKind};
use calsync_common::replay;

use crate::calendly_call::CalendlyCalls;
use crate::deps::Deps;
use crate::error::ProcessError;

/// Checks one connection's subscription; returns the resync to queue when it had to be replaced.
pub async fn check(
    Deps { pool, calls, callback_url, broker, replay_days, .. }: &Deps,
    connection_id: uuid::Uuid,
) -> Result<Option<SyncJob>, ProcessError> {
    let Some(connection) = connections::find(pool, connection_id).await? else { return Ok(None) };
    if connection.status != ConnectionStatus::Active {
        return Ok(None);
    }
    catch_up_parked(pool, broker, &connection, *replay_days).await;
    let current = connection.webhook_subscription_uri.clone();
    let found = match &current {
        // No subscription was ever made (callback URL unset at connect) and none is wanted.
        None if callback_url.is_none() => return Ok(None),
        None => None,
        Some(uri) => read(calls, &connection, uri).await?,
    };
    let state = state_of(found.as_ref());
    metrics::counter!("calsync_subscription_checks_total", "state" => state.as_str()).increment(1);
    if let Some(uri) = &current {
        let failing_since = found.as_ref().and_then(|s| s.retry_started_at);
        connections::record_subscription_check(pool, &connection, uri, state, failing_since).await?;
    }
    match state {
        SubscriptionState::Active => Ok(None),
        SubscriptionState::Failing => {
            tracing::warn!(%connection_id, since = ?found.and_then(|s| s.retry_started_at), "Calendly is failing to deliver webhooks to this connection's subscription");
            Ok(None)
        }
        SubscriptionState::Disabled | SubscriptionState::Missing => {
            let replacing = Replacing { old_uri: current.as_deref(), old: found.as_ref(), was: state };
            replace(pool, calls, callback_url.as_ref(), &connection, replacing).await
        }
    }
}

/// Parked deliveries addressed to an *active* connection are stale: the connect that should have
/// replayed them was cut short, or a refresh stored late brought a `needs_reauth` row back to
/// `active`. Replayed here, so they never wait for a reconnect that will not come. Best effort: what
/// fails now is tried again at the next check.
async fn catch_up_parked(pool: &PgPool, broker: &Broker, connection: &Connection, replay_days: u32) {
    let Some(account) = &connection.calendly_user_uri else { return };
    match replay::replay_parked(pool, broker, account, replay_days).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(connection_id = %connection.id, replayed = n, "replayed parked deliveries of an active connection")
        }
        Err(error) => tracing::warn!(connection_id = %connection.id, %error, "could not replay parked deliveries"),
    }
}

/// The subscription at `uri`, or `None` when Calendly no longer has it.
async fn read(calls: &CalendlyCalls, connection: &Connection, uri: &str) -> Result<Option<Subscription>, ProcessError> {
    calls
        .call_auxiliary(connection, |token| async move {
            match calls.calendly().get_subscription(uri, &token).await {
                Ok(found) => Ok(Some(found)),
                Err(CalendlyError::NotFound) => Ok(None),
                Err(other) => Err(other),
            }
        })
        .await
}

fn state_of(found: Option<&Subscription>) -> SubscriptionState {
    match found {
        None => SubscriptionState::Missing,
        Some(s) if s.state != "active" => SubscriptionState::Disabled,
        Some(s) if s.retry_started_at.is_some() => SubscriptionState::Failing,
        Some(_) => SubscriptionState::Active,
    }
}

/// The subscription being replaced: where it was, what Calendly said of it, and why it goes.
struct Replacing<'a> {
    old_uri: Option<&'a str>,
    old: Option<&'a Subscription>,
    was: SubscriptionState,
}

async fn replace(
    pool: &PgPool,
    calls: &CalendlyCalls,
    callback_url: Option<&url::Url>,
    connection: &Connection,
    Replacing { old_uri, old, was: state }: Replacing<'_>,
) -> Result<Option<SyncJob>, ProcessError> {
    let connection_id = connection.id;
    let (Some(organization), Some(user)) = (&connection.calendly_organization_uri, &connection.calendly_user_uri)
    else {
        return Ok(None);
    };
    // Where webhooks should go now; else where the broken subscription pointed.
    let Some(callback_url) = callback_url.map(|u| u.to_string()).or_else(|| old.map(|s| s.callback_url.clone())) else {
        let reason =
            "the webhook subscription is gone and cannot be replaced: set CALENDLY_WEBHOOK_CALLBACK_URL on the worker";
        return Err(ProcessError::Permanent(reason.into()));
    };
    let new_uri = calls
        .call_auxiliary(connection, |token| {
            let callback_url = callback_url.clone();
            async move {
                subscription::ensure(calls.calendly(), &callback_url, organization, user, &token).await.map_err(|e| {
                    match e {
                        SubscriptionError::Calendly(e) => e,
                        other => CalendlyError::Unexpected(other.to_string()),
                    }
                })
            }
        })
        .await?;
    if !connections::replace_subscription(pool, connection, old_uri, &new_uri).await? {
        // Disconnected or reconnected meanwhile: the replacement belongs to nobody.
        delete_quietly(calls, connection, &new_uri).await;
        return Ok(None);
    }
    if let Some(old_uri) = old_uri.filter(|old| *old != new_uri) {
        delete_quietly(calls, connection, old_uri).await;
    }
    metrics::counter!("calsync_subscription_repairs_total", "was" => state.as_str()).increment(1);
    tracing::warn!(%connection_id, was = state.as_str(), %new_uri, "webhook subscription replaced; resyncing what was missed");
    Ok(Some(SyncJob::new(connection_id, SyncKind::Resync)))
}

async fn delete_quietly(calls: &CalendlyCalls, connection: &Connection, uri: &str) {
    let deleted = calls
        .call_auxiliary(connection, |token| async move { calls.calendly().delete_subscription(uri, &token).await })
        .await;
    if let Err(error) = deleted {
        tracing::warn!(connection_id = %connection.id, %error, "could not delete a webhook subscription at Calendly");
    }
}
