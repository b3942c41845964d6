//! The right user's access token, refreshed exactly once per expiry however many workers want it.

use secrecy::SecretString;
use time::OffsetDateTime;

use calsync_common::calendly::CalendlyError;
use calsync_common::db::connections::{self, ACCESS_TOKEN, Connection, ConnectionStatus, REFRESH_TOKEN, binding};
use calsync_common::retry;

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
    refresh_locked(deps, connection, None).await
}

/// After Calendly answered 401 to `rejected`: refresh, unless another worker already did.
pub async fn after_unauthorized(
    deps: &Deps,
    connection: &Connection,
    rejected: &AccessToken,
) -> Result<AccessToken, ProcessError> {
    refresh_locked(deps, connection, Some(&rejected.ciphertext)).await
}

async fn refresh_locked(
    deps: &Deps,
    connection: &Connection,
    rejected: Option<&str>,
) -> Result<AccessToken, ProcessError> {
    let mut tx = deps.pool.begin().await?;
    let row = connections::lock(&mut tx, connection.id)
        .await?
        .ok_or_else(|| ProcessError::transient("connection vanished"))?;
    // The row may have been reconnected to another Calendly account (or user) since this delivery
    // resolved it: that account's token is not this delivery's to use, or to refresh.
    if row.user_id != connection.user_id || row.calendly_user_uri != connection.calendly_user_uri {
        return Err(ProcessError::transient("the connection changed hands while processing; resolving again"));
    }
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
            let stored = async {
                connections::store_tokens(&mut tx, row.id, &access, &refresh, expires_at).await?;
                tx.commit().await
            };
            if let Err(error) = stored.await {
                let pair = Refreshed { access: &access, refresh: &refresh, expires_at };
                keep_refreshed_pair(deps, &row, pair, error).await;
            }
            metrics::counter!("calsync_token_refreshes_total", "outcome" => "refreshed").increment(1);
            tracing::info!(connection_id = %row.id, "access token refreshed");
            // The work at hand uses the new token whether or not it could be stored.
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

/// A refreshed pair, encrypted for its row.
struct Refreshed<'a> {
    access: &'a str,
    refresh: &'a str,
    expires_at: OffsetDateTime,
}

/// Calendly has consumed the old refresh token, so after a failed write the new pair exists nowhere
/// but here: keep trying to store it on fresh connections, and count and log loudly if it finally
/// cannot be (the user will then have to reconnect).
async fn keep_refreshed_pair(deps: &Deps, row: &Connection, pair: Refreshed<'_>, first: sqlx::Error) {
    tracing::warn!(connection_id = %row.id, error = %first, "refreshed tokens not stored; retrying the write");
    let mut delays = retry::token_store();
    let consumed = row.refresh_token.as_deref();
    loop {
        let stored =
            connections::store_refreshed(&deps.pool, row.id, consumed, pair.access, pair.refresh, pair.expires_at);
        match stored.await {
            Ok(true) => {
                metrics::counter!("calsync_token_refreshes_total", "outcome" => "stored_late").increment(1);
                tracing::info!(connection_id = %row.id, "refreshed tokens stored after retrying");
                return;
            }
            Ok(false) => {
                // Disconnected (or refreshed by someone else) meanwhile: nothing of ours to keep.
                tracing::warn!(connection_id = %row.id, "connection changed before the refreshed tokens were stored");
                return;
            }
            Err(error) => match delays.next_delay() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    metrics::counter!("calsync_token_refreshes_total", "outcome" => "lost").increment(1);
                    tracing::error!(
                        connection_id = %row.id, %error,
                        "REFRESHED TOKENS LOST: the database refused them; this user must reconnect Calendly"
                    );
                    return;
                }
            },
        }
    }
}
