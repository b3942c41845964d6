//! Refreshing a connection's tokens exactly once per expiry (a lease in the row, not a lock held
//! across the call to Calendly), storing the pair, and the reauth verdict.

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Connection, ConnectionStatus};
use crate::db::changes::{self, Cause, ReauthReason};

/// Claims the right to refresh `connection`'s token for `lease`, if it still needs one (its token
/// expires within `margin`, or is still the `rejected` one after a 401), it still belongs to the same
/// user and Calendly account and is active, and nobody else holds an unexpired lease. One statement:
/// two workers can never both win, and no connection is held while the winner talks to Calendly.
pub async fn claim_refresh(
    pool: &PgPool,
    connection: &Connection,
    owner: Uuid,
    rejected: Option<&str>,
    lease: std::time::Duration,
    margin: time::Duration,
) -> sqlx::Result<Option<Connection>> {
    sqlx::query_as(concat!(
        "UPDATE calendar_connections SET refresh_lease_owner = $2, \
             refresh_lease_until = now() + make_interval(secs => $3) \
         WHERE id = $1 AND user_id = $4 AND calendly_user_uri = $5 AND status = $6 \
           AND (refresh_lease_until IS NULL OR refresh_lease_until < now()) \
           AND CASE WHEN $7::text IS NULL \
                    THEN token_expires_at IS NULL OR token_expires_at <= now() + make_interval(secs => $8) \
                    ELSE access_token = $7 END \
         RETURNING ",
        connection_columns!()
    ))
    .bind(connection.id)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(connection.user_id)
    .bind(&connection.calendly_user_uri)
    .bind(ConnectionStatus::Active)
    .bind(rejected)
    .bind(margin.as_seconds_f64())
    .fetch_optional(pool)
    .await
}

/// Gives a refresh lease back (the refresh failed; someone else may try).
pub async fn release_refresh(pool: &PgPool, id: Uuid, owner: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET refresh_lease_owner = NULL, refresh_lease_until = NULL \
         WHERE id = $1 AND refresh_lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .execute(pool)
    .await
    .map(|_| ())
}

/// Stores the pair a lease holder got from Calendly and ends the lease. False when the lease is no
/// longer ours (it expired and was taken over, or a disconnect cleared it).
pub async fn store_leased_refresh(
    pool: &PgPool,
    id: Uuid,
    owner: Uuid,
    access_ciphertext: &str,
    refresh_ciphertext: &str,
    expires_at: OffsetDateTime,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE calendar_connections SET access_token = $3, refresh_token = $4, token_expires_at = $5, \
             last_error = NULL, refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = now() \
         WHERE id = $1 AND refresh_lease_owner = $2 AND status <> $6",
    )
    .bind(id)
    .bind(owner)
    .bind(access_ciphertext)
    .bind(refresh_ciphertext)
    .bind(expires_at)
    .bind(ConnectionStatus::Disconnected)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Stores a refreshed pair outside the refresh's own transaction (its write failed), only while the
/// row still holds `consumed`, the refresh token that produced the pair: a disconnect or a newer
/// refresh meanwhile wins. A `needs_reauth` set since then came from someone presenting the consumed
/// token, so the row is active again. Returns whether the pair was stored.
pub async fn store_refreshed(
    pool: &PgPool,
    id: Uuid,
    consumed: Option<&str>,
    access_ciphertext: &str,
    refresh_ciphertext: &str,
    expires_at: OffsetDateTime,
) -> sqlx::Result<bool> {
    let mut tx = changes::begin(pool, Cause::Refresh).await?;
    let done = sqlx::query(
        "UPDATE calendar_connections SET access_token = $2, refresh_token = $3, token_expires_at = $4, \
             last_error = NULL, status = CASE WHEN status = $6 THEN $7 ELSE status END, \
             refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = now() \
         WHERE id = $1 AND refresh_token = $5 AND status <> $8",
    )
    .bind(id)
    .bind(access_ciphertext)
    .bind(refresh_ciphertext)
    .bind(expires_at)
    .bind(consumed)
    .bind(ConnectionStatus::NeedsReauth)
    .bind(ConnectionStatus::Active)
    .bind(ConnectionStatus::Disconnected)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

/// The user has to reconnect. The account stays linked to the user (`is_active`), so its webhooks
/// are parked as `awaiting_reauth` instead of becoming `unmatched`.
///
/// Only the row as `seen` moves: still active (a disconnect that raced us stays disconnected), the
/// same user and Calendly account (a reconnect of another account is not its problem), and still
/// holding `access_seen`, the access token the failure was about (a refresh or reconnect since
/// then replaced it, so the failure no longer describes the row). Returns whether it moved.
pub async fn mark_needs_reauth(
    pool: &PgPool,
    seen: &Connection,
    access_seen: Option<&str>,
    code: ReauthReason,
    reason: &str,
) -> sqlx::Result<bool> {
    let mut tx = changes::begin(pool, Cause::Refresh).await?;
    let moved = sqlx::query(
        "UPDATE calendar_connections SET status = $3, last_error = $2, reauth_reason = $8, \
             refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = now() \
         WHERE id = $1 AND status = $4 AND user_id = $5 AND calendly_user_uri IS NOT DISTINCT FROM $6 \
           AND access_token IS NOT DISTINCT FROM $7",
    )
    .bind(seen.id)
    .bind(reason)
    .bind(ConnectionStatus::NeedsReauth)
    .bind(ConnectionStatus::Active)
    .bind(seen.user_id)
    .bind(seen.calendly_user_uri.as_deref())
    .bind(access_seen)
    .bind(code)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(moved.rows_affected() == 1)
}
