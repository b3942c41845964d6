//! The right user's access token, refreshed exactly once per expiry however many workers want it.

use secrecy::SecretString;
use time::OffsetDateTime;
use uuid::Uuid;

use calsync_common::calendly::CalendlyError;
use calsync_common::db::connections::{self, ACCESS_TOKEN, Connection, ConnectionStatus, REFRESH_TOKEN, binding};

use crate::deps::Deps;
use crate::error::ProcessError;

/// Refresh when the token expires within this margin, so no call races its expiry.
pub const REFRESH_MARGIN: time::Duration = time::Duration::minutes(5);

/// A decrypted access token and the ciphertext it came from (to tell, after a 401, whether someone
/// else has refreshed in the meantime).
pub struct AccessToken {
    pub secret: SecretString,
    pub ciphertext: String,
}

fn fresh(expires_at: Option<OffsetDateTime>) -> bool {
    expires_at.is_some_and(|t| t > OffsetDateTime::now_utc() + REFRESH_MARGIN)
}

/// `connection`'s access token, refreshed first when it expires within [`REFRESH_MARGIN`].
pub async fn access_token(deps: &Deps, connection: &Connection) -> Result<AccessToken, ProcessError> {
    if fresh(connection.token_expires_at)
        && let Some(ciphertext) = &connection.access_token
    {
        return Ok(AccessToken { secret: connection.decrypt_access(&deps.cipher)?, ciphertext: ciphertext.clone() });
    }
    refresh_locked(deps, connection.id, None).await
}

/// After Calendly answered 401 to `rejected`: refresh, unless another worker already did.
pub async fn after_unauthorized(
    deps: &Deps,
    connection_id: Uuid,
    rejected: &AccessToken,
) -> Result<AccessToken, ProcessError> {
    refresh_locked(deps, connection_id, Some(&rejected.ciphertext)).await
}

async fn refresh_locked(deps: &Deps, connection_id: Uuid, rejected: Option<&str>) -> Result<AccessToken, ProcessError> {
    let mut tx = deps.pool.begin().await?;
    let row = connections::lock(&mut tx, connection_id)
        .await?
        .ok_or_else(|| ProcessError::transient("connection vanished"))?;
    match row.status {
        ConnectionStatus::Active => {}
        ConnectionStatus::NeedsReauth => {
            return Err(ProcessError::NeedsReauth("the connection needs to be reconnected".into()));
        }
        // Disconnected while we worked: a retry resolves the delivery again (and parks it).
        ConnectionStatus::Disconnected => {
            return Err(ProcessError::transient("the connection was disconnected while processing"));
        }
    }
    // Re-read under the lock: whoever held it before us may have refreshed already.
    let someone_refreshed = match rejected {
        None => fresh(row.token_expires_at),
        Some(rejected) => row.access_token.as_deref() != Some(rejected),
    };
    if someone_refreshed && let Some(ciphertext) = row.access_token.clone() {
        tx.commit().await?;
        return Ok(AccessToken { secret: row.decrypt_access(&deps.cipher)?, ciphertext });
    }
    let refresh_token = row.decrypt_refresh(&deps.cipher)?;
    // The lock is held across this call on purpose: the refresh token is single-use, so nobody else
    // may present it until the new pair is committed.
    match deps.calendly.refresh(&refresh_token).await {
        Ok(tokens) => {
            let access = deps.cipher.encrypt(&tokens.access_token, binding(row.id, ACCESS_TOKEN));
            let refresh = deps.cipher.encrypt(&tokens.refresh_token, binding(row.id, REFRESH_TOKEN));
            let expires_at = tokens.expires_at(OffsetDateTime::now_utc());
            connections::store_tokens(&mut tx, row.id, &access, &refresh, expires_at).await?;
            tx.commit().await?;
            metrics::counter!("calsync_token_refreshes_total", "outcome" => "refreshed").increment(1);
            tracing::info!(connection_id = %row.id, "access token refreshed");
            Ok(AccessToken { secret: SecretString::from(tokens.access_token), ciphertext: access })
        }
        Err(CalendlyError::InvalidGrant(detail)) => {
            let reason = format!("refresh token rejected by Calendly (invalid_grant): {detail}");
            connections::mark_needs_reauth(&mut tx, row.id, &reason).await?;
            tx.commit().await?;
            metrics::counter!("calsync_token_refreshes_total", "outcome" => "invalid_grant").increment(1);
            tracing::warn!(connection_id = %row.id, "refresh token rejected; connection needs reauth");
            Err(ProcessError::NeedsReauth(reason))
        }
        Err(error) => {
            metrics::counter!("calsync_token_refreshes_total", "outcome" => "error").increment(1);
            Err(error.into())
        }
    }
}
