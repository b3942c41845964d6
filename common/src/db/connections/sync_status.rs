//! The last sync pass of a connection (backfill, resync or reconciliation), as the app sees it:
//! what kind, when it started and finished, how it ended, and how many meetings and invitees it
//! had to correct.

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

/// `calendar_connections.sync_result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum SyncResult {
    Running,
    Done,
    Failed,
}

/// The last sync pass (`sync` in `GET /connections/calendly/{user_id}`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct SyncStatus {
    pub kind: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub result: SyncResult,
    /// Meetings and invitees the pass found different from Calendly and fixed.
    pub corrected: i32,
}

/// The last sync pass of connection `id`, if it ever had one.
pub async fn sync_status(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<SyncStatus>> {
    sqlx::query_as(
        "SELECT sync_kind AS kind, sync_started_at AS started_at, sync_finished_at AS finished_at, \
             sync_result AS result, sync_corrected AS corrected \
         FROM calendar_connections WHERE id = $1 AND sync_kind IS NOT NULL",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// A pass of `kind` begins (from its first page).
pub async fn sync_started(pool: &PgPool, id: Uuid, kind: &str, started_at: OffsetDateTime) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET sync_kind = $2, sync_started_at = $3, sync_finished_at = NULL, \
             sync_result = $4, sync_corrected = 0 WHERE id = $1",
    )
    .bind(id)
    .bind(kind)
    .bind(started_at)
    .bind(SyncResult::Running)
    .execute(pool)
    .await
    .map(|_| ())
}

/// Inside the transaction that wrote them: the pass corrected `n` more meetings and invitees.
pub async fn add_corrected(tx: &mut PgConnection, id: Uuid, n: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE calendar_connections SET sync_corrected = sync_corrected + $2 WHERE id = $1")
        .bind(id)
        .bind(i32::try_from(n).unwrap_or(i32::MAX))
        .execute(tx)
        .await
        .map(|_| ())
}

/// The running pass ended with `result`.
pub async fn sync_ended(pool: &PgPool, id: Uuid, result: SyncResult) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET sync_result = $2, sync_finished_at = now() \
         WHERE id = $1 AND sync_result = $3",
    )
    .bind(id)
    .bind(result)
    .bind(SyncResult::Running)
    .execute(pool)
    .await
    .map(|_| ())
}
