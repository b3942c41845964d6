//! `calsync-worker rotate-token-key`: re-encrypting every stored secret with the current `TOKEN_ENCRYPTION_KEY` after a rotation
//! (`calsync-worker rotate-token-key`).

use sqlx::PgPool;
use uuid::Uuid;

use calsync_common::crypto::{CryptoError, TokenCipher};
use calsync_common::db::connections::{ACCESS_TOKEN, REFRESH_TOKEN, binding};
use calsync_common::db::{oauth_states, pending};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    pub connections_reencrypted: u64,
    pub states_reencrypted: u64,
    pub pending_reencrypted: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A value no configured key can read: rotation stops rather than leave it behind silently.
    #[error("connection {id}: {source}")]
    Undecryptable { id: String, source: CryptoError },
}

/// Re-encrypts every token written with an older key. Each row is locked while it is rewritten,
/// so a concurrent refresh never loses its new tokens to a stale rewrite. Idempotent.
pub async fn reencrypt_all(pool: &PgPool, cipher: &TokenCipher) -> Result<RotationReport, RotationError> {
    let mut report = RotationReport::default();
    let ids: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM calendar_connections WHERE access_token IS NOT NULL OR refresh_token IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    for (id,) in ids {
        let mut tx = pool.begin().await?;
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT access_token, refresh_token FROM calendar_connections WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((access, refresh)) = row else { continue };
        let rewrite = |value: Option<String>, column: &'static str| -> Result<Option<String>, RotationError> {
            match value {
                Some(v) if cipher.is_stale(&v) => {
                    let plain = cipher
                        .decrypt(&v, binding(id, column))
                        .map_err(|source| RotationError::Undecryptable { id: id.to_string(), source })?;
                    Ok(Some(cipher.encrypt(secrecy::ExposeSecret::expose_secret(&plain), binding(id, column))))
                }
                other => Ok(other),
            }
        };
        let (new_access, new_refresh) =
            (rewrite(access.clone(), ACCESS_TOKEN)?, rewrite(refresh.clone(), REFRESH_TOKEN)?);
        if new_access != access || new_refresh != refresh {
            sqlx::query("UPDATE calendar_connections SET access_token = $2, refresh_token = $3, updated_at = now() WHERE id = $1")
                .bind(id)
                .bind(new_access)
                .bind(new_refresh)
                .execute(&mut *tx)
                .await?;
            report.connections_reencrypted += 1;
        }
        tx.commit().await?;
    }
    let states: Vec<(String, String)> = sqlx::query_as(
        "SELECT state_hash, code_verifier FROM oauth_states WHERE used_at IS NULL AND expires_at > now()",
    )
    .fetch_all(pool)
    .await?;
    for (hash, verifier) in states {
        if !cipher.is_stale(&verifier) {
            continue;
        }
        let plain = cipher
            .decrypt(&verifier, oauth_states::verifier_binding(&hash))
            .map_err(|source| RotationError::Undecryptable { id: hash.clone(), source })?;
        let fresh = cipher.encrypt(secrecy::ExposeSecret::expose_secret(&plain), oauth_states::verifier_binding(&hash));
        // Only rewrite what we read: a state consumed meanwhile keeps its (now irrelevant) value.
        sqlx::query("UPDATE oauth_states SET code_verifier = $2 WHERE state_hash = $1 AND code_verifier = $3")
            .bind(&hash)
            .bind(fresh)
            .bind(&verifier)
            .execute(pool)
            .await?;
        report.states_reencrypted += 1;
    }
    // Consents waiting for the app's confirm hold tokens too (for ten minutes at most).
    let held: Vec<(String, String, String)> =
        sqlx::query_as("SELECT connect_id_hash, access_token, refresh_token FROM pending_connections")
            .fetch_all(pool)
            .await?;
    for (hash, access, refresh) in held {
        if !cipher.is_stale(&access) && !cipher.is_stale(&refresh) {
            continue;
        }
        let reseal = |value: &str, column: &'static str| -> Result<String, RotationError> {
            let plain = cipher
                .decrypt(value, pending::binding(&hash, column))
                .map_err(|source| RotationError::Undecryptable { id: hash.clone(), source })?;
            Ok(cipher.encrypt(secrecy::ExposeSecret::expose_secret(&plain), pending::binding(&hash, column)))
        };
        let (new_access, new_refresh) = (reseal(&access, ACCESS_TOKEN)?, reseal(&refresh, REFRESH_TOKEN)?);
        // Only rewrite what we read: a pending result confirmed meanwhile is gone, which is fine.
        sqlx::query(
            "UPDATE pending_connections SET access_token = $2, refresh_token = $3 \
             WHERE connect_id_hash = $1 AND access_token = $4",
        )
        .bind(&hash)
        .bind(new_access)
        .bind(new_refresh)
        .bind(&access)
        .execute(pool)
        .await?;
        report.pending_reencrypted += 1;
    }
    Ok(report)
}
