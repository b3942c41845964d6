//! `calendar_connections`: one row per app user and provider, with encrypted tokens.
//!
//! This file holds the row, its spellings and the lookups; the writes are split by job:
//! - [`tokens`]: refresh leases, storing refreshed pairs, the reauth verdict;
//! - [`linking`]: who a row belongs to — connect, the write-time link check, disconnect;
//! - [`subscription`]: the webhook subscription's URI and health;
//! - [`sync_status`]: the last sync pass, for the app;
//! - [`imported`]: rows moved in from an existing integration.
//!
//! Their functions are re-exported here, so callers write `connections::claim_refresh`.

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

impl ConnectionStatus {
    pub const ALL: [Self; 3] = [Self::Active, Self::NeedsReauth, Self::Disconnected];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::NeedsReauth => "needs_reauth",
            Self::Disconnected => "disconnected",
        }
    }
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

/// [`Resolved`] with the position of the delivery it answers.
#[derive(sqlx::FromRow)]
struct ResolvedAt {
    wanted_at: i64,
    #[sqlx(flatten)]
    resolved: Resolved,
}

/// For each delivery `(created_by, message_id)` of `wanted`, the active connection of that
/// Calendly user with the inbox status of that message — many deliveries in one statement. Answer
/// `i` is delivery `i`'s, matched through its own position (`WITH ORDINALITY`): each delivery is
/// found by its own `created_by` alone, whatever else the statement looks up.
pub async fn resolve_all(pool: &PgPool, wanted: &[(&CalendlyUserUri, &str)]) -> sqlx::Result<Vec<Option<Resolved>>> {
    let (uris, message_ids): (Vec<&str>, Vec<&str>) = wanted.iter().map(|(uri, id)| (uri.as_str(), *id)).unzip();
    let rows: Vec<ResolvedAt> = sqlx::query_as(concat!(
        "SELECT w.wanted_at, ",
        connection_columns!(),
        ", (SELECT status FROM webhook_inbox WHERE message_id = w.wanted_message) AS inbox_status \
         FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS w(wanted_uri, wanted_message, wanted_at) \
         JOIN calendar_connections ON provider = $1 AND calendly_user_uri = w.wanted_uri AND is_active"
    ))
    .bind(PROVIDER)
    .bind(&uris)
    .bind(&message_ids)
    .fetch_all(pool)
    .await?;
    let mut answers = vec![None; wanted.len()];
    for row in rows {
        // 1-based, and only ever a position of `wanted`.
        if let Some(answer) = usize::try_from(row.wanted_at - 1).ok().and_then(|i| answers.get_mut(i)) {
            *answer = Some(row.resolved);
        }
    }
    Ok(answers)
}

pub async fn find_by_user(pool: &PgPool, user_id: Uuid) -> sqlx::Result<Option<Connection>> {
    sqlx::query_as(select_connection!("WHERE provider = $1 AND user_id = $2"))
        .bind(PROVIDER)
        .bind(user_id)
        .fetch_optional(pool)
        .await
}

/// Every connection row, oldest first (for operators).
pub async fn all(pool: &PgPool) -> sqlx::Result<Vec<Connection>> {
    sqlx::query_as(select_connection!("ORDER BY created_at")).fetch_all(pool).await
}

pub async fn find(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Connection>> {
    sqlx::query_as(select_connection!("WHERE id = $1")).bind(id).fetch_optional(pool).await
}

/// Locks the row for the rest of the transaction. Refreshers of one connection queue up here, so
/// a single-use refresh token is exchanged once, and the second in line sees the new tokens.
pub async fn lock(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Connection>> {
    sqlx::query_as(select_connection!("WHERE id = $1 FOR UPDATE")).bind(id).fetch_optional(tx).await
}

/// A sync pass finished: records when it started (and that it is done), and clears a sync failure it supersedes
/// (`<kind> failed: ...`, written when an earlier pass was dead-lettered). Other problems (a
/// subscription that cannot be checked, a refused disconnect cleanup) stay until their own
/// cause is resolved.
pub async fn set_synced(pool: &PgPool, id: Uuid, at: OffsetDateTime) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET last_synced_at = $2, updated_at = now(), \
             last_error = CASE WHEN last_error ~ '^(backfill|resync|reconcile) failed: ' THEN NULL ELSE last_error END, \
             sync_result = CASE WHEN sync_result = $3 THEN $4 ELSE sync_result END, \
             sync_finished_at = CASE WHEN sync_result = $3 THEN now() ELSE sync_finished_at END \
         WHERE id = $1",
    )
    .bind(id)
    .bind(at)
    .bind(SyncResult::Running)
    .bind(SyncResult::Done)
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

mod imported;
mod linking;
mod subscription;
mod sync_status;
mod tokens;

pub use imported::*;
pub use linking::*;
pub use subscription::*;
pub use sync_status::*;
pub use tokens::*;
