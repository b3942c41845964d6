//! `oauth_states`: the single-use, short-lived state of an OAuth connect, stored hashed, with the
//! user it was issued for and the (encrypted) PKCE verifier.

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::crypto::Binding;

pub const TABLE: &str = "oauth_states";

pub fn verifier_binding(state_hash: &str) -> Binding {
    Binding { table: TABLE, row: state_hash.to_owned(), column: "code_verifier" }
}

pub async fn insert(
    pool: &PgPool,
    state_hash: &str,
    user_id: Uuid,
    verifier_ciphertext: &str,
    expires_at: OffsetDateTime,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO oauth_states (state_hash, user_id, code_verifier, expires_at) VALUES ($1, $2, $3, $4)")
        .bind(state_hash)
        .bind(user_id)
        .bind(verifier_ciphertext)
        .bind(expires_at)
        .execute(pool)
        .await
        .map(|_| ())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateRejection {
    Unknown,
    Expired,
    AlreadyUsed,
}

/// Consumes a state: returns its user and verifier ciphertext exactly once, while it is unexpired.
pub async fn take(pool: &PgPool, state_hash: &str) -> sqlx::Result<Result<(Uuid, String), StateRejection>> {
    // One UPDATE both checks and marks: two racing callbacks with the same state cannot both win.
    let taken: Option<(Uuid, String)> = sqlx::query_as(
        "UPDATE oauth_states SET used_at = now() \
         WHERE state_hash = $1 AND used_at IS NULL AND expires_at > now() \
         RETURNING user_id, code_verifier",
    )
    .bind(state_hash)
    .fetch_optional(pool)
    .await?;
    if let Some(taken) = taken {
        return Ok(Ok(taken));
    }
    let row: Option<(Option<OffsetDateTime>,)> =
        sqlx::query_as("SELECT used_at FROM oauth_states WHERE state_hash = $1")
            .bind(state_hash)
            .fetch_optional(pool)
            .await?;
    Ok(Err(match row {
        None => StateRejection::Unknown,
        Some((Some(_),)) => StateRejection::AlreadyUsed,
        Some((None,)) => StateRejection::Expired,
    }))
}

/// Marks a state used without returning it (a denied consent still burns its state).
pub async fn burn(pool: &PgPool, state_hash: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE oauth_states SET used_at = now() WHERE state_hash = $1 AND used_at IS NULL")
        .bind(state_hash)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Drops states that can no longer be used (called opportunistically when new ones are made).
pub async fn purge_stale(pool: &PgPool) -> sqlx::Result<u64> {
    sqlx::query("DELETE FROM oauth_states WHERE expires_at < now() - interval '1 day'")
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}
