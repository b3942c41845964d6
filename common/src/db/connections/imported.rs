//! Connections imported from an existing integration (`calsync-worker import-connections`): stored
//! only for an app user who has no connection row at all, so nothing calsync holds is overwritten,
//! and marked `imported_at` so a rerun can tell them apart.

use std::collections::HashMap;

use sqlx::PgPool;
use uuid::Uuid;

use super::linking::insert_connected;
use super::{Connected, Connection, ConnectionStatus, PROVIDER, StoreError};
use crate::crypto::TokenCipher;
use crate::db::changes::{self, Cause, ReauthReason};

/// What calsync already holds for an app user, as an import sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Existing {
    pub status: ConnectionStatus,
    /// Made by an earlier import (rather than by the user connecting through calsync).
    pub imported: bool,
}

/// The connection rows calsync already has for any of `user_ids`.
pub async fn existing_for(pool: &PgPool, user_ids: &[Uuid]) -> sqlx::Result<HashMap<Uuid, Existing>> {
    let rows: Vec<(Uuid, ConnectionStatus, bool)> = sqlx::query_as(
        "SELECT user_id, status, imported_at IS NOT NULL FROM calendar_connections \
         WHERE provider = $1 AND user_id = ANY($2)",
    )
    .bind(PROVIDER)
    .bind(user_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(user, status, imported)| (user, Existing { status, imported })).collect())
}

/// What [`store_imported`] did.
#[derive(Debug)]
pub enum Imported {
    /// Stored, `active`: the import goes on with the same steps as a confirmed connect.
    Stored(Box<Connection>),
    /// The app user has a connection row already (made since the import looked): left alone.
    UserHasConnection,
    /// The Calendly account is linked to another app user: left alone.
    AccountTaken,
}

/// Stores a verified imported connection (`active`, tokens encrypted, `connection.active` in the
/// change feed with cause `connect`), unless the app user has a connection row or the Calendly
/// account belongs to another app user.
pub async fn store_imported(pool: &PgPool, cipher: &TokenCipher, c: &Connected<'_>) -> sqlx::Result<Imported> {
    let mut tx = changes::begin(pool, Cause::Connect).await?;
    let insert = concat!(
        "INSERT INTO calendar_connections (id, user_id, provider, calendly_user_uri, calendly_organization_uri, \
             access_token, refresh_token, token_expires_at, is_active, status, imported_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true, $9, now()) \
         ON CONFLICT (provider, user_id) DO NOTHING RETURNING ",
        connection_columns!()
    );
    let outcome = match insert_connected(&mut tx, cipher, Uuid::new_v4(), c, insert).await {
        Ok(Some(connection)) => Imported::Stored(Box::new(connection)),
        Ok(None) => Imported::UserHasConnection,
        Err(StoreError::AccountTaken) => return Ok(Imported::AccountTaken),
        Err(StoreError::Database(e)) => return Err(e),
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Stores an imported row whose token Calendly would not confirm as `needs_reauth` with `code` and
/// `reason` (`connection.needs_reauth` in the change feed), so the app prompts its user. It names
/// no Calendly account and holds no token: an identity Calendly did not confirm is not trusted with
/// anyone's webhooks (they stay `unmatched`, and are replayed when the user reconnects). False when
/// the app user has a connection row already.
pub async fn store_unverified(pool: &PgPool, user_id: Uuid, code: ReauthReason, reason: &str) -> sqlx::Result<bool> {
    let mut tx = changes::begin(pool, Cause::Connect).await?;
    let stored = sqlx::query(
        "INSERT INTO calendar_connections (id, user_id, provider, is_active, status, reauth_reason, last_error, \
             imported_at) \
         VALUES ($1, $2, $3, true, $4, $5, $6, now()) ON CONFLICT (provider, user_id) DO NOTHING",
    )
    .bind(Uuid::new_v4())
    .bind(user_id)
    .bind(PROVIDER)
    .bind(ConnectionStatus::NeedsReauth)
    .bind(code)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(stored.rows_affected() == 1)
}
