//! The right user's access token, refreshed exactly once per expiry however many workers want it,
//! under a lease in the row rather than a lock held across the call to Calendly.

use std::time::{Duration, Instant};

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use time::OffsetDateTime;
use tracing::Instrument;
use uuid::Uuid;

use calsync_common::calendly::{CalendlyClient, CalendlyError};
use calsync_common::crypto::TokenCipher;
use calsync_common::db::changes::ReauthReason;
use calsync_common::db::connections::{self, ACCESS_TOKEN, Connection, ConnectionStatus, REFRESH_TOKEN, binding};
use calsync_common::{retry, traces};

use crate::budget::{Budget, Budgets};
use crate::error::ProcessError;
use crate::single_flight::{Flight, SingleFlight};

/// Refresh when the token expires within this margin, so no call races its expiry.
pub const REFRESH_MARGIN: time::Duration = time::Duration::minutes(5);

pub use crate::access_token::AccessToken;

/// In-flight token refreshes in this process by (connection, Calendly account, rejected token):
/// deliveries of one user waiting for one refresh wait on it here, not each by polling the database.
type Refreshes = SingleFlight<(Uuid, Option<String>, Option<String>), AccessToken>;

/// Users' access tokens: a cheap-to-clone handle that owns what refreshing needs.
#[derive(Clone)]
pub struct Tokens {
    /// Leases and stored pairs live in the connection's row.
    pool: PgPool,
    /// The token endpoint (refresh, revoke).
    calendly: CalendlyClient,
    /// Tokens are stored encrypted, bound to their row.
    cipher: Arc<TokenCipher>,
    /// Refreshes in flight in this process, shared by the deliveries of one connection.
    refreshes: Arc<Refreshes>,
    /// Token requests draw on their own budget (8 a minute per Calendly user), shared by the fleet.
    budgets: Budgets,
}

impl Tokens {
    pub fn new(pool: PgPool, calendly: CalendlyClient, cipher: Arc<TokenCipher>, budgets: Budgets) -> Self {
        Self { pool, calendly, cipher, refreshes: Arc::default(), budgets }
    }

    /// `connection`'s access token, refreshed first when it expires within [`REFRESH_MARGIN`].
    pub async fn access_token(&self, connection: &Connection) -> Result<AccessToken, ProcessError> {
        access_token(self, connection).await
    }

    /// After Calendly answered 401 to `rejected`: refresh, unless another worker already did.
    pub async fn after_unauthorized(
        &self,
        connection: &Connection,
        rejected: &AccessToken,
    ) -> Result<AccessToken, ProcessError> {
        after_unauthorized(self, connection, rejected).await
    }

    /// The one way a connection is parked for its user to reconnect: `needs_reauth` with `reason`
    /// in `last_error`, only while the row is still as `seen` and holds `access_seen` (see
    /// `connections::mark_needs_reauth`). Returns what the delivery at hand becomes: parked, or —
    /// when the row moved on meanwhile (refreshed, reconnected, disconnected) — retried, so it is
    /// resolved again against the row as it now is.
    pub async fn park(
        &self,
        seen: &Connection,
        access_seen: Option<&str>,
        code: ReauthReason,
        reason: String,
    ) -> ProcessError {
        match connections::mark_needs_reauth(&self.pool, seen, access_seen, code, &reason).await {
            Ok(true) => {
                tracing::warn!(connection_id = %seen.id, %reason, "connection needs reauth");
                ProcessError::NeedsReauth(reason)
            }
            Ok(false) => ProcessError::transient("the connection changed meanwhile; resolving the delivery again"),
            Err(error) => error.into(),
        }
    }
}

fn fresh(expires_at: Option<OffsetDateTime>) -> bool {
    expires_at.is_some_and(|t| t > OffsetDateTime::now_utc() + REFRESH_MARGIN)
}

/// How long a refresh lease lasts: well past the refresh call's own timeout, so it only ever
/// expires when its holder died mid-refresh.
const REFRESH_LEASE: Duration = Duration::from_secs(30);
/// How often a worker waiting for someone else's refresh looks for the new pair.
const LEASE_POLL: Duration = Duration::from_millis(100);

/// `connection`'s access token, refreshed first when it expires within [`REFRESH_MARGIN`].
async fn access_token(tk: &Tokens, connection: &Connection) -> Result<AccessToken, ProcessError> {
    if fresh(connection.token_expires_at)
        && let Some(ciphertext) = &connection.access_token
    {
        let secret = open(tk, connection, connection.decrypt_access(&tk.cipher)).await?;
        return Ok(AccessToken { secret, ciphertext: ciphertext.clone() });
    }
    refresh(tk, connection, None).await
}

/// After Calendly answered 401 to `rejected`: refresh, unless another worker already did.
async fn after_unauthorized(
    tk: &Tokens,
    connection: &Connection,
    rejected: &AccessToken,
) -> Result<AccessToken, ProcessError> {
    refresh(tk, connection, Some(&rejected.ciphertext)).await
}

/// Exactly one refresh per expiry. Within this process, deliveries of one connection share one
/// refresh (a follower whose leader failed tries for itself); across processes, the lease decides.
async fn refresh(tk: &Tokens, connection: &Connection, rejected: Option<&str>) -> Result<AccessToken, ProcessError> {
    let key = (connection.id, connection.calendly_user_uri.clone(), rejected.map(str::to_owned));
    match tk.refreshes.run_or_join(key, || refresh_across_processes(tk, connection, rejected)).await {
        Flight::Led(result) => result,
        Flight::Joined(Some(token)) => Ok(token),
        Flight::Joined(None) => refresh_across_processes(tk, connection, rejected).await,
    }
}

/// Whoever claims the lease refreshes; the others wait for its new pair, polling the row without
/// holding a pooled connection while Calendly takes its time (so a slow refresh for one user never
/// starves other users' deliveries).
async fn refresh_across_processes(
    tk: &Tokens,
    connection: &Connection,
    rejected: Option<&str>,
) -> Result<AccessToken, ProcessError> {
    let owner = Uuid::new_v4();
    let started = Instant::now();
    loop {
        let claimed =
            connections::claim_refresh(&tk.pool, connection, owner, rejected, REFRESH_LEASE, REFRESH_MARGIN).await?;
        if let Some(row) = claimed {
            let span = refresh_span(&row);
            return refresh_leased(tk, row, owner).instrument(span).await;
        }
        // Not ours to refresh: find out why.
        let row = connections::find(&tk.pool, connection.id)
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
        let someone_refreshed = match rejected {
            None => fresh(row.token_expires_at),
            Some(rejected) => row.access_token.as_deref() != Some(rejected),
        };
        if someone_refreshed && let Some(ciphertext) = row.access_token.clone() {
            return Ok(AccessToken { secret: open(tk, &row, row.decrypt_access(&tk.cipher)).await?, ciphertext });
        }
        // Another worker holds the lease and is talking to Calendly.
        if started.elapsed() > REFRESH_LEASE + Duration::from_secs(5) {
            return Err(ProcessError::transient("waited too long for another worker's token refresh"));
        }
        tokio::time::sleep(LEASE_POLL).await;
    }
}

/// The span of one token refresh (with traces on): the connection it is for, never a token.
fn refresh_span(row: &Connection) -> tracing::Span {
    if !traces::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "token refresh",
        otel.kind = "internal",
        connection_id = %row.id,
        message_id = tracing::field::Empty,
    );
    traces::record_message_id(&span);
    span
}

/// Refreshes with the lease held: the single-use refresh token is ours alone to present.
async fn refresh_leased(tk: &Tokens, row: Connection, owner: Uuid) -> Result<AccessToken, ProcessError> {
    let refresh_token = match row.decrypt_refresh(&tk.cipher) {
        Ok(token) => token,
        // Parking the connection ends the lease too.
        Err(error) if error.is_integrity() => return Err(open(tk, &row, Err(error)).await.unwrap_err()),
        Err(error) => {
            connections::release_refresh(&tk.pool, row.id, owner).await?;
            return Err(error.into());
        }
    };
    if let Err(error) = within_token_budget(tk, &row).await {
        connections::release_refresh(&tk.pool, row.id, owner).await?;
        return Err(error);
    }
    match tk.calendly.refresh(&refresh_token).await {
        Ok(tokens) => {
            let access = tk.cipher.encrypt(tokens.access_token.expose_secret(), binding(row.id, ACCESS_TOKEN));
            let refresh = tk.cipher.encrypt(tokens.refresh_token.expose_secret(), binding(row.id, REFRESH_TOKEN));
            let pair = Refreshed {
                access: &access,
                refresh: &refresh,
                expires_at: tokens.expires_at(OffsetDateTime::now_utc()),
            };
            let stored =
                connections::store_leased_refresh(&tk.pool, row.id, owner, &access, &refresh, pair.expires_at).await;
            let kept = match stored {
                Ok(true) => true,
                // The lease is no longer ours, or the write failed: Calendly consumed the old
                // refresh token, so this pair is the only one left; keep trying to store it.
                Ok(false) => keep_refreshed_pair(tk, &row, &pair, None).await,
                Err(error) => keep_refreshed_pair(tk, &row, &pair, Some(error)).await,
            };
            if !kept {
                // Disconnected meanwhile: a pair nobody will use must not stay valid at Calendly.
                for token in [&tokens.refresh_token, &tokens.access_token] {
                    let _ = tk.calendly.revoke(token).await;
                }
                return Err(ProcessError::transient("the connection changed while refreshing its token"));
            }
            metrics::counter!("calsync_token_refreshes_total", "outcome" => "refreshed").increment(1);
            tracing::info!(connection_id = %row.id, "access token refreshed");
            // The work at hand uses the new token.
            Ok(AccessToken { secret: tokens.access_token, ciphertext: access })
        }
        Err(CalendlyError::InvalidGrant(detail)) => {
            metrics::counter!("calsync_token_refreshes_total", "outcome" => "invalid_grant").increment(1);
            let reason = format!("refresh token rejected by Calendly (invalid_grant): {detail}");
            Err(tk.park(&row, row.access_token.as_deref(), ReauthReason::InvalidGrant, reason).await)
        }
        Err(error) => {
            metrics::counter!("calsync_token_refreshes_total", "outcome" => "error").increment(1);
            connections::release_refresh(&tk.pool, row.id, owner).await?;
            Err(error.into())
        }
    }
}

/// Takes one of the user's token requests (8 a minute, across the fleet), or puts the work off
/// until the window resets: the refresh token stays unused, so nothing is lost by waiting.
async fn within_token_budget(tk: &Tokens, row: &Connection) -> Result<(), ProcessError> {
    match tk.budgets.reserve(Budget::Token, row).await? {
        // Counted when taken; the token endpoint's answers say nothing about the window.
        Ok(_counted) => Ok(()),
        Err(wait) => {
            metrics::counter!("calsync_calendly_budget_deferrals_total").increment(1);
            let reason = format!("this Calendly user's token requests are spent; the window resets in {wait:?}");
            Err(ProcessError::Deferred { reason, until: wait })
        }
    }
}

/// A stored token of `row`, decrypted. A value that fails its integrity check for this row (copied
/// from another row, or corrupted) is this connection's problem: it becomes `needs_reauth` with
/// reason `integrity` and its deliveries are parked, while every other connection carries on and
/// the worker stays ready. Only a key this worker does not hold is a configuration error (retried,
/// reported by readiness).
async fn open(
    tk: &Tokens,
    row: &Connection,
    opened: Result<SecretString, calsync_common::crypto::CryptoError>,
) -> Result<SecretString, ProcessError> {
    let error = match opened {
        Ok(secret) => return Ok(secret),
        Err(error) if error.is_integrity() => error,
        Err(error) => return Err(error.into()),
    };
    let reason = format!("integrity: {error}; the user must reconnect Calendly");
    Err(tk.park(row, row.access_token.as_deref(), ReauthReason::Integrity, reason).await)
}

/// A refreshed pair, encrypted for its row.
struct Refreshed<'a> {
    access: &'a str,
    refresh: &'a str,
    expires_at: OffsetDateTime,
}

/// Calendly has consumed the old refresh token, so after a failed write the new pair exists nowhere
/// but here: keep trying to store it on fresh connections, and count and log loudly if it finally
/// cannot be (the user will then have to reconnect). Returns false when the row changed meanwhile
/// (disconnected, or refreshed by someone else): the pair is then nobody's.
async fn keep_refreshed_pair(tk: &Tokens, row: &Connection, pair: &Refreshed<'_>, first: Option<sqlx::Error>) -> bool {
    if let Some(error) = first {
        tracing::warn!(connection_id = %row.id, %error, "refreshed tokens not stored; retrying the write");
    }
    let mut delays = retry::token_store();
    let consumed = row.refresh_token.as_deref();
    loop {
        let stored =
            connections::store_refreshed(&tk.pool, row.id, consumed, pair.access, pair.refresh, pair.expires_at);
        match stored.await {
            Ok(true) => {
                metrics::counter!("calsync_token_refreshes_total", "outcome" => "stored_late").increment(1);
                tracing::info!(connection_id = %row.id, "refreshed tokens stored after retrying");
                return true;
            }
            Ok(false) => {
                tracing::warn!(connection_id = %row.id, "connection changed before the refreshed tokens were stored");
                return false;
            }
            Err(error) => match delays.next_delay() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    metrics::counter!("calsync_token_refreshes_total", "outcome" => "lost").increment(1);
                    tracing::error!(
                        connection_id = %row.id, %error,
                        "REFRESHED TOKENS LOST: the database refused them; this user must reconnect Calendly"
                    );
                    // Still used for the work at hand; the user will have to reconnect.
                    return true;
                }
            },
        }
    }
}
