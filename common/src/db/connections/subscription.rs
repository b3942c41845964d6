//! The connection's webhook subscription: its URI, and what the periodic check found.

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Connection, ConnectionStatus, SubscriptionState};
use crate::db::changes::{self, Cause};

/// Records the webhook subscription (just created or found active) and what went wrong setting the
/// connection up, if anything.
pub async fn set_subscription(
    pool: &PgPool,
    id: Uuid,
    subscription_uri: Option<&str>,
    last_error: Option<&str>,
) -> sqlx::Result<()> {
    let mut tx = changes::begin(pool, Cause::Connect).await?;
    sqlx::query(
        "UPDATE calendar_connections SET webhook_subscription_uri = $2, last_error = $3, \
             subscription_state = CASE WHEN $2::text IS NULL THEN NULL ELSE 'active' END, \
             subscription_failing_since = NULL, subscription_checked_at = now(), updated_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(subscription_uri)
    .bind(last_error)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Records what a subscription check found for `subscription_uri`. Guarded by the URI, the status
/// and the row as `seen` (user and Calendly account): a check that raced a reconnect (new
/// subscription, or another account) or a disconnect writes nothing.
pub async fn record_subscription_check(
    pool: &PgPool,
    seen: &Connection,
    subscription_uri: &str,
    state: SubscriptionState,
    failing_since: Option<OffsetDateTime>,
) -> sqlx::Result<bool> {
    let mut tx = changes::begin(pool, Cause::SubscriptionCheck).await?;
    let updated = sqlx::query(
        "UPDATE calendar_connections SET subscription_state = $3, subscription_failing_since = $4, \
             subscription_checked_at = now() \
         WHERE id = $1 AND webhook_subscription_uri = $2 AND status = $5 AND user_id = $6 \
           AND calendly_user_uri IS NOT DISTINCT FROM $7",
    )
    .bind(seen.id)
    .bind(subscription_uri)
    .bind(state)
    .bind(failing_since)
    .bind(ConnectionStatus::Active)
    .bind(seen.user_id)
    .bind(seen.calendly_user_uri.as_deref())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(updated.rows_affected() == 1)
}

/// Swaps a connection's subscription for its replacement (state `active`). Guarded like
/// [`record_subscription_check`]: false when the row moved on meanwhile (then the caller deletes
/// the replacement instead of the old one).
pub async fn replace_subscription(
    pool: &PgPool,
    seen: &Connection,
    old_uri: Option<&str>,
    new_uri: &str,
) -> sqlx::Result<bool> {
    let mut tx = changes::begin(pool, Cause::SubscriptionCheck).await?;
    let updated = sqlx::query(
        "UPDATE calendar_connections SET webhook_subscription_uri = $3, subscription_state = 'active', \
             subscription_failing_since = NULL, subscription_checked_at = now(), updated_at = now() \
         WHERE id = $1 AND webhook_subscription_uri IS NOT DISTINCT FROM $2 AND status = $4 AND user_id = $5 \
           AND calendly_user_uri IS NOT DISTINCT FROM $6",
    )
    .bind(seen.id)
    .bind(old_uri)
    .bind(new_uri)
    .bind(ConnectionStatus::Active)
    .bind(seen.user_id)
    .bind(seen.calendly_user_uri.as_deref())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(updated.rows_affected() == 1)
}

/// How many connections are in each subscription state (for `calsync_subscriptions{state}`).
/// Calendly connections by status (the gauge operators alert on for `needs_reauth`).
pub async fn count_by_status(pool: &PgPool) -> sqlx::Result<Vec<(ConnectionStatus, i64)>> {
    sqlx::query_as("SELECT status, count(*) FROM calendar_connections WHERE provider = 'calendly' GROUP BY status")
        .fetch_all(pool)
        .await
}

pub async fn count_by_subscription_state(pool: &PgPool) -> sqlx::Result<Vec<(SubscriptionState, i64)>> {
    sqlx::query_as(
        "SELECT subscription_state, count(*) FROM calendar_connections \
         WHERE status = $1 AND subscription_state IS NOT NULL GROUP BY subscription_state",
    )
    .bind(ConnectionStatus::Active)
    .fetch_all(pool)
    .await
}
