//! `calendar_connections`: one row per app user and provider, with encrypted tokens.

use secrecy::SecretString;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::calendly::webhook::CalendlyUserUri;
use crate::crypto::{Binding, CryptoError, TokenCipher};
use crate::db::inbox::InboxStatus;

pub const PROVIDER: &str = "calendly";
pub const TABLE: &str = "calendar_connections";
pub const ACCESS_TOKEN: &str = "access_token";
pub const REFRESH_TOKEN: &str = "refresh_token";

/// `calendar_connections.status`. The only place its spellings exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    /// Tokens work; webhooks become meetings.
    Active,
    /// Calendly refused the refresh token: still linked to its user (`is_active`), deliveries are
    /// parked as `awaiting_reauth` until the user connects again.
    NeedsReauth,
    /// Unlinked by the user: tokens wiped, later webhooks are `unmatched`.
    Disconnected,
}

/// `calendar_connections.subscription_state`: what the last subscription check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// Calendly delivers to it.
    Active,
    /// Calendly is retrying failed deliveries to it (`retry_started_at`): it will be disabled
    /// after 24 hours of this.
    Failing,
    /// Calendly gave up on it and delivers nothing more (replaced by the next check).
    Disabled,
    /// Calendly has no such subscription any more (replaced by the next check).
    Missing,
}

impl SubscriptionState {
    pub const ALL: [Self; 4] = [Self::Active, Self::Failing, Self::Disabled, Self::Missing];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Failing => "failing",
            Self::Disabled => "disabled",
            Self::Missing => "missing",
        }
    }
}

/// A `calendar_connections` row. Deliberately not `Serialize`: what the API shows of it is a
/// struct of its own beside the handler, so a new column never becomes public by accident.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Connection {
    pub id: Uuid,
    pub user_id: Uuid,
    pub provider: String,
    pub calendly_user_uri: Option<String>,
    pub calendly_organization_uri: Option<String>,
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
    pub token_expires_at: Option<OffsetDateTime>,
    pub is_active: bool,
    pub status: ConnectionStatus,
    pub webhook_subscription_uri: Option<String>,
    pub last_synced_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub subscription_state: Option<SubscriptionState>,
    /// Since when Calendly has been failing to deliver (while `subscription_state` is `failing`).
    pub subscription_failing_since: Option<OffsetDateTime>,
    /// When `subscription_state` was last found out (a check, or the connect that made it).
    pub subscription_checked_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// The AES-GCM binding of a token column of row `id`.
pub fn binding(id: Uuid, column: &'static str) -> Binding {
    Binding { table: TABLE, row: id.to_string(), column }
}

impl Connection {
    pub fn decrypt_access(&self, cipher: &TokenCipher) -> Result<SecretString, CryptoError> {
        cipher.decrypt(self.access_token.as_deref().ok_or(CryptoError::Format)?, binding(self.id, ACCESS_TOKEN))
    }

    pub fn decrypt_refresh(&self, cipher: &TokenCipher) -> Result<SecretString, CryptoError> {
        cipher.decrypt(self.refresh_token.as_deref().ok_or(CryptoError::Format)?, binding(self.id, REFRESH_TOKEN))
    }
}

/// The columns of [`Connection`], as a literal (sqlx only runs `'static` SQL), so every query that
/// reads a connection lists them in one place.
macro_rules! connection_columns {
    () => {
        "id, user_id, provider, calendly_user_uri, calendly_organization_uri, access_token, refresh_token, \
         token_expires_at, is_active, status, webhook_subscription_uri, last_synced_at, last_error, subscription_state, \
         subscription_failing_since, subscription_checked_at, created_at, updated_at"
    };
}

/// `SELECT <connection columns> FROM calendar_connections <rest>`.
macro_rules! select_connection {
    ($rest:literal) => {
        concat!("SELECT ", connection_columns!(), " FROM calendar_connections ", $rest)
    };
}

/// A delivery's connection and what the inbox already says about the delivery, in one round trip
/// (the hot path of every webhook). The connection is the one whose Calendly user created the
/// subscription; only linked rows (`is_active`) match, and there is deliberately no fallback.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Resolved {
    #[sqlx(flatten)]
    pub connection: Connection,
    pub inbox_status: Option<InboxStatus>,
}

/// The active connection of `calendly_user_uri`, with the inbox status of `message_id`.
pub async fn resolve_for_delivery(
    pool: &PgPool,
    calendly_user_uri: &CalendlyUserUri,
    message_id: &str,
) -> sqlx::Result<Option<Resolved>> {
    sqlx::query_as(concat!(
        "SELECT ",
        connection_columns!(),
        ", (SELECT status FROM webhook_inbox WHERE message_id = $3) AS inbox_status \
         FROM calendar_connections WHERE provider = $1 AND calendly_user_uri = $2 AND is_active"
    ))
    .bind(PROVIDER)
    .bind(calendly_user_uri.as_str())
    .bind(message_id)
    .fetch_optional(pool)
    .await
}

pub async fn find_by_user(pool: &PgPool, user_id: Uuid) -> sqlx::Result<Option<Connection>> {
    sqlx::query_as(select_connection!("WHERE provider = $1 AND user_id = $2"))
        .bind(PROVIDER)
        .bind(user_id)
        .fetch_optional(pool)
        .await
}

pub async fn find(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Connection>> {
    sqlx::query_as(select_connection!("WHERE id = $1")).bind(id).fetch_optional(pool).await
}

/// Locks the row for the rest of the transaction. Refreshers of one connection queue up here, so
/// a single-use refresh token is exchanged once, and the second in line sees the new tokens.
pub async fn lock(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Connection>> {
    sqlx::query_as(select_connection!("WHERE id = $1 FOR UPDATE")).bind(id).fetch_optional(tx).await
}

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
    .execute(pool)
    .await?;
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
    tx: &mut PgConnection,
    seen: &Connection,
    access_seen: Option<&str>,
    reason: &str,
) -> sqlx::Result<bool> {
    let moved = sqlx::query(
        "UPDATE calendar_connections SET status = $3, last_error = $2, refresh_lease_owner = NULL, \
             refresh_lease_until = NULL, updated_at = now() \
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
    .execute(tx)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// A sync pass finished: records when it started, and clears a sync failure it supersedes
/// (`<kind> failed: ...`, written when an earlier pass was dead-lettered). Other problems (a
/// subscription that cannot be checked, a refused disconnect cleanup) stay until their own
/// cause is resolved.
pub async fn set_synced(pool: &PgPool, id: Uuid, at: OffsetDateTime) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET last_synced_at = $2, updated_at = now(), \
             last_error = CASE WHEN last_error ~ '^(backfill|resync|reconcile) failed: ' THEN NULL ELSE last_error END \
         WHERE id = $1",
    )
    .bind(id)
    .bind(at)
    .execute(pool)
    .await
    .map(|_| ())
}

pub async fn set_last_error(pool: &PgPool, id: Uuid, error: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE calendar_connections SET last_error = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(error)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Inside a write transaction: true when `connection` still belongs to the same user and Calendly
/// account and is active. The share lock holds off a concurrent disconnect or reconnect until the
/// transaction ends, so rows are never written for an account that changed hands meanwhile.
pub async fn lock_if_linked(tx: &mut PgConnection, connection: &Connection) -> sqlx::Result<bool> {
    Ok(lock_linked(tx, &[connection]).await?.first().copied().unwrap_or(false))
}

/// [`lock_if_linked`] for many connections in one statement: for each of `connections`, in order,
/// whether *its own* `(id, user_id, calendly_user_uri)` is still the active row. Answered per
/// entry, not per row id: one batch may hold a delivery resolved before an account switch and one
/// resolved after it (same row id, another Calendly account), and only the second may be written.
pub async fn lock_linked(tx: &mut PgConnection, connections: &[&Connection]) -> sqlx::Result<Vec<bool>> {
    let linked: Vec<i64> = sqlx::query_scalar(
        "SELECT k.n FROM calendar_connections c \
         JOIN UNNEST($1::uuid[], $2::uuid[], $3::text[]) WITH ORDINALITY AS k(id, user_id, uri, n) \
           ON c.id = k.id AND c.user_id = k.user_id AND c.calendly_user_uri = k.uri \
         WHERE c.status = $4 ORDER BY c.id FOR SHARE OF c",
    )
    .bind(connections.iter().map(|c| c.id).collect::<Vec<_>>())
    .bind(connections.iter().map(|c| c.user_id).collect::<Vec<_>>())
    .bind(connections.iter().map(|c| c.calendly_user_uri.as_deref()).collect::<Vec<_>>())
    .bind(ConnectionStatus::Active)
    .fetch_all(tx)
    .await?;
    let mut answer = vec![false; connections.len()];
    for n in linked {
        // WITH ORDINALITY counts from 1.
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| answer.get_mut(i)) {
            *slot = true;
        }
    }
    Ok(answer)
}

/// True when `calendly_user_uri` is linked (`is_active`) to an app user other than `user_id`.
pub async fn is_linked_to_another_user(pool: &PgPool, calendly_user_uri: &str, user_id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM calendar_connections \
         WHERE provider = $1 AND calendly_user_uri = $2 AND is_active AND user_id <> $3)",
    )
    .bind(PROVIDER)
    .bind(calendly_user_uri)
    .bind(user_id)
    .fetch_one(pool)
    .await
}

/// Records the webhook subscription (just created or found active) and what went wrong setting the
/// connection up, if anything.
pub async fn set_subscription(
    pool: &PgPool,
    id: Uuid,
    subscription_uri: Option<&str>,
    last_error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET webhook_subscription_uri = $2, last_error = $3, \
             subscription_state = CASE WHEN $2::text IS NULL THEN NULL ELSE 'active' END, \
             subscription_failing_since = NULL, subscription_checked_at = now(), updated_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(subscription_uri)
    .bind(last_error)
    .execute(pool)
    .await
    .map(|_| ())
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
    .execute(pool)
    .await?;
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
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// How many connections are in each subscription state (for `calsync_subscriptions{state}`).
pub async fn count_by_subscription_state(pool: &PgPool) -> sqlx::Result<Vec<(SubscriptionState, i64)>> {
    sqlx::query_as(
        "SELECT subscription_state, count(*) FROM calendar_connections \
         WHERE status = $1 AND subscription_state IS NOT NULL GROUP BY subscription_state",
    )
    .bind(ConnectionStatus::Active)
    .fetch_all(pool)
    .await
}

/// The ids of all active connections (the periodic checks visit each).
pub async fn active_ids(pool: &PgPool) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar("SELECT id FROM calendar_connections WHERE status = $1 ORDER BY id")
        .bind(ConnectionStatus::Active)
        .fetch_all(pool)
        .await
}

/// The id of `user_id`'s connection row, if the user ever connected.
pub async fn id_of_user(tx: &mut PgConnection, user_id: Uuid) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar("SELECT id FROM calendar_connections WHERE provider = $1 AND user_id = $2")
        .bind(PROVIDER)
        .bind(user_id)
        .fetch_optional(tx)
        .await
}

/// Wipes the tokens and unlinks the row (`disconnected`, `is_active = false`), recording what went
/// wrong at Calendly on the way, if anything.
pub async fn mark_disconnected(tx: &mut PgConnection, id: Uuid, problems: Option<&str>) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET access_token = NULL, refresh_token = NULL, token_expires_at = NULL, \
         status = $3, is_active = false, webhook_subscription_uri = NULL, subscription_state = NULL, \
         subscription_failing_since = NULL, last_error = $2, \
         refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(problems)
    .bind(ConnectionStatus::Disconnected)
    .execute(tx)
    .await
    .map(|_| ())
}

/// Records what a disconnect could not clean up at Calendly, after the row was unlinked. Only while
/// the row is still that disconnect's result: a reconnect since then owns `last_error`.
pub async fn record_disconnect_problems(pool: &PgPool, id: Uuid, problems: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET last_error = $2, updated_at = now() \
         WHERE id = $1 AND status = $3 AND access_token IS NULL",
    )
    .bind(id)
    .bind(problems)
    .bind(ConnectionStatus::Disconnected)
    .execute(pool)
    .await
    .map(|_| ())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The Calendly account is actively connected to a different app user.
    #[error("this Calendly account is already connected to another user")]
    AccountTaken,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// What a successful OAuth connection stores.
pub struct Connected<'a> {
    pub user_id: Uuid,
    pub calendly_user_uri: &'a str,
    pub calendly_organization_uri: &'a str,
    pub access_token: &'a str,
    pub refresh_token: &'a str,
    pub expires_at: OffsetDateTime,
}

/// Stores (or replaces in place, on reconnect) `user_id`'s connection with fresh tokens, status
/// `active`. Fails with [`StoreError::AccountTaken`] when another user holds that Calendly account.
pub async fn store_connected(pool: &PgPool, cipher: &TokenCipher, c: &Connected<'_>) -> Result<Connection, StoreError> {
    let mut tx = pool.begin().await?;
    // Tokens are bound to the row id, so the id must be known before encrypting: lock the user's
    // existing row (if any) so a concurrent connect of the same user waits for us.
    let existing: Option<(Uuid,)> =
        sqlx::query_as("SELECT id FROM calendar_connections WHERE provider = $1 AND user_id = $2 FOR UPDATE")
            .bind(PROVIDER)
            .bind(c.user_id)
            .fetch_optional(&mut *tx)
            .await?;
    let id = existing.map_or_else(Uuid::new_v4, |(id,)| id);
    let access = cipher.encrypt(c.access_token, binding(id, ACCESS_TOKEN));
    let refresh = cipher.encrypt(c.refresh_token, binding(id, REFRESH_TOKEN));
    let result = sqlx::query(
        "INSERT INTO calendar_connections (id, user_id, provider, calendly_user_uri, calendly_organization_uri, \
             access_token, refresh_token, token_expires_at, is_active, status, last_error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true, $9, NULL) \
         ON CONFLICT (provider, user_id) DO UPDATE SET calendly_user_uri = EXCLUDED.calendly_user_uri, \
             calendly_organization_uri = EXCLUDED.calendly_organization_uri, access_token = EXCLUDED.access_token, \
             refresh_token = EXCLUDED.refresh_token, token_expires_at = EXCLUDED.token_expires_at, \
             is_active = true, status = EXCLUDED.status, last_error = NULL, updated_at = now()",
    )
    .bind(id)
    .bind(c.user_id)
    .bind(PROVIDER)
    .bind(c.calendly_user_uri)
    .bind(c.calendly_organization_uri)
    .bind(&access)
    .bind(&refresh)
    .bind(c.expires_at)
    .bind(ConnectionStatus::Active)
    .execute(&mut *tx)
    .await;
    match result {
        Ok(_) => {}
        // calendar_connections_active_calendly_user_key: one Calendly account, one app user.
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("calendar_connections_active_calendly_user_key") => {
            return Err(StoreError::AccountTaken);
        }
        Err(e) => return Err(e.into()),
    }
    let connection = sqlx::query_as(select_connection!("WHERE id = $1")).bind(id).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(connection)
}
