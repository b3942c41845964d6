//! `change_log`: what the app is told changed (ARCHITECTURE.md, "Telling the app what changed").
//!
//! Rows are written by triggers (migration `create_change_log`) in the transaction that makes the
//! change, so every write path records its changes and a write that changes nothing records none.
//! Calsync's part is saying *why*: each transaction that may change a meeting, an invitee or a
//! connection is begun with [`begin`] (or tagged with [`tag`]) and a [`Cause`]. A change made by
//! hand outside calsync is recorded with cause `operator`.
//!
//! # Positions, and why a reader following the cursor cannot skip a change
//! Rows are inserted without a `position`. [`sequence`] numbers them afterwards: under the row lock
//! of `change_feed` (so one sequencer at a time, whichever process runs it), it gives the committed
//! rows that have none the next positions after `change_feed.last_position`, and moves that mark, in
//! one transaction. Numbers are therefore handed out only to rows that are already committed, in
//! increasing order, and become visible all at once with the mark: when a reader sees position `p`,
//! every position below `p` is already visible too. A transaction that began earlier but commits
//! later simply gets a later position; nothing is ever numbered below what a reader has passed.
//! (A `bigserial` read as `id > last` has no such property: ids are drawn at insert, and a row with
//! a lower id that commits after a reader passed a higher one is never read.)
//!
//! Within one run rows are numbered in insert order (`seq`), so two changes of one meeting — whose
//! row lock orders their transactions — keep their order.

use std::fmt;
use std::str::FromStr;

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

/// What caused a change (`change_log.cause`). The only place its spellings exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize, serde::Deserialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Webhook,
    Sync,
    Connect,
    Disconnect,
    /// The worker's handling of the user's grant: a refresh Calendly refused, a token that failed
    /// its integrity check, a grant lacking a scope — and a refresh that brought one back.
    Refresh,
    SubscriptionCheck,
    /// An operator command, or a change made by hand.
    Operator,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Sync => "sync",
            Self::Connect => "connect",
            Self::Disconnect => "disconnect",
            Self::Refresh => "refresh",
            Self::SubscriptionCheck => "subscription_check",
            Self::Operator => "operator",
        }
    }
}

/// `change_log.kind`. The only place its spellings exist (the triggers write them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, serde::Serialize, serde::Deserialize)]
#[sqlx(type_name = "text")]
pub enum Kind {
    #[sqlx(rename = "meeting.created")]
    #[serde(rename = "meeting.created")]
    MeetingCreated,
    #[sqlx(rename = "meeting.updated")]
    #[serde(rename = "meeting.updated")]
    MeetingUpdated,
    #[sqlx(rename = "meeting.canceled")]
    #[serde(rename = "meeting.canceled")]
    MeetingCanceled,
    #[sqlx(rename = "invitee.created")]
    #[serde(rename = "invitee.created")]
    InviteeCreated,
    #[sqlx(rename = "invitee.canceled")]
    #[serde(rename = "invitee.canceled")]
    InviteeCanceled,
    #[sqlx(rename = "invitee.no_show_changed")]
    #[serde(rename = "invitee.no_show_changed")]
    InviteeNoShowChanged,
    #[sqlx(rename = "connection.active")]
    #[serde(rename = "connection.active")]
    ConnectionActive,
    #[sqlx(rename = "connection.needs_reauth")]
    #[serde(rename = "connection.needs_reauth")]
    ConnectionNeedsReauth,
    #[sqlx(rename = "connection.disconnected")]
    #[serde(rename = "connection.disconnected")]
    ConnectionDisconnected,
    #[sqlx(rename = "connection.subscription_failing")]
    #[serde(rename = "connection.subscription_failing")]
    ConnectionSubscriptionFailing,
    #[sqlx(rename = "connection.subscription_repaired")]
    #[serde(rename = "connection.subscription_repaired")]
    ConnectionSubscriptionRepaired,
}

impl Kind {
    pub const ALL: [Self; 11] = [
        Self::MeetingCreated,
        Self::MeetingUpdated,
        Self::MeetingCanceled,
        Self::InviteeCreated,
        Self::InviteeCanceled,
        Self::InviteeNoShowChanged,
        Self::ConnectionActive,
        Self::ConnectionNeedsReauth,
        Self::ConnectionDisconnected,
        Self::ConnectionSubscriptionFailing,
        Self::ConnectionSubscriptionRepaired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MeetingCreated => "meeting.created",
            Self::MeetingUpdated => "meeting.updated",
            Self::MeetingCanceled => "meeting.canceled",
            Self::InviteeCreated => "invitee.created",
            Self::InviteeCanceled => "invitee.canceled",
            Self::InviteeNoShowChanged => "invitee.no_show_changed",
            Self::ConnectionActive => "connection.active",
            Self::ConnectionNeedsReauth => "connection.needs_reauth",
            Self::ConnectionDisconnected => "connection.disconnected",
            Self::ConnectionSubscriptionFailing => "connection.subscription_failing",
            Self::ConnectionSubscriptionRepaired => "connection.subscription_repaired",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection needs its user to reconnect (`change_log.reason`,
/// `calendar_connections.reauth_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ReauthReason {
    /// Calendly refused the refresh token.
    InvalidGrant,
    /// The grant lacks a scope calsync needs.
    InsufficientScope,
    /// The stored token failed its integrity check for its row.
    Integrity,
    /// An imported grant whose owner Calendly could not confirm: no token, a token refused even
    /// after a refresh, or a refreshed grant Calendly could not be asked about.
    Unverified,
}

impl ReauthReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidGrant => "invalid_grant",
            Self::InsufficientScope => "insufficient_scope",
            Self::Integrity => "integrity",
            Self::Unverified => "unverified",
        }
    }
}

/// Begins a transaction whose changes are recorded with `cause` (one round trip: `BEGIN` and the
/// setting travel together).
pub async fn begin(pool: &PgPool, cause: Cause) -> sqlx::Result<Transaction<'static, Postgres>> {
    pool.begin_with(begin_statement(cause, "")).await
}

/// The `BEGIN` of a transaction with `cause`, followed by `extra` (e.g. `"; SET LOCAL ..."`).
pub fn begin_statement(cause: Cause, extra: &'static str) -> AssertSqlSafe<String> {
    // Safe: `cause` is one of our own fixed spellings and `extra` a literal, never outside input.
    AssertSqlSafe(format!("BEGIN; SET LOCAL calsync.cause = '{}'{extra}", cause.as_str()))
}

/// Records the changes of the rest of the transaction on `tx` with `cause`.
pub async fn tag(tx: &mut PgConnection, cause: Cause) -> sqlx::Result<()> {
    sqlx::query("SELECT set_config('calsync.cause', $1, true)").bind(cause.as_str()).execute(tx).await.map(|_| ())
}

/// Meeting and invitee changes the transaction on `tx` has recorded so far (a sync pass's
/// corrections). Rows this transaction inserted have no position yet and carry its id as `xmin`.
pub async fn meeting_changes_in_transaction(tx: &mut PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM change_log \
         WHERE position IS NULL AND xmin = pg_current_xact_id()::xid \
           AND (kind LIKE 'meeting.%' OR kind LIKE 'invitee.%')",
    )
    .fetch_one(tx)
    .await
}

/// A reader's place in the feed: the position of the last change it has seen. Opaque to readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor(i64);

impl Cursor {
    pub fn position(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a cursor this feed gave out")]
pub struct GarbledCursor;

impl FromStr for Cursor {
    type Err = GarbledCursor;

    fn from_str(s: &str) -> Result<Self, GarbledCursor> {
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(GarbledCursor);
        }
        s.parse().map(Cursor).map_err(|_| GarbledCursor)
    }
}

impl serde::Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One change, as the app receives it (pull and push). No personal data: the app reads the rows
/// it is told about.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Change {
    pub change_id: Uuid,
    /// Where this change is in the feed: passing it as `after` reads what follows.
    #[sqlx(try_from = "i64")]
    pub cursor: Cursor,
    pub user_id: Uuid,
    pub kind: Kind,
    pub meeting_id: Option<Uuid>,
    pub calendly_event_uri: Option<String>,
    pub invitee_id: Option<Uuid>,
    pub connection_id: Option<Uuid>,
    pub status: Option<String>,
    pub reason: Option<String>,
    pub cause: Cause,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
}

impl From<i64> for Cursor {
    fn from(position: i64) -> Self {
        Cursor(position)
    }
}

/// The columns of a [`Change`] (a macro, so queries stay static strings).
macro_rules! change_columns {
    () => {
        "change_id, position AS cursor, user_id, kind, meeting_id, calendly_event_uri, invitee_id, connection_id, \
         status, reason, cause, occurred_at"
    };
}

/// Gives the committed changes that have no position yet the next positions (at most `max`), and
/// returns how many of each kind it numbered. See the module comment for why this order is safe.
/// Returns nothing at once when another sequencer is at work (its numbers become visible when it
/// commits; waiting for it would only queue readers behind it).
pub async fn sequence(pool: &PgPool, max: i64) -> sqlx::Result<Vec<(Kind, i64)>> {
    let mut tx = pool.begin().await?;
    let last: Option<i64> = sqlx::query_scalar("SELECT last_position FROM change_feed FOR UPDATE SKIP LOCKED")
        .fetch_optional(&mut *tx)
        .await?;
    let Some(last) = last else { return Ok(Vec::new()) };
    // A new statement, so its snapshot is taken after the lock: every row committed by now is seen.
    let numbered: Vec<(Kind, i64)> = sqlx::query_as(
        "WITH next AS ( \
             SELECT change_id, row_number() OVER (ORDER BY seq) AS n FROM change_log \
             WHERE position IS NULL ORDER BY seq LIMIT $2 \
         ), numbered AS ( \
             UPDATE change_log c SET position = $1 + next.n FROM next WHERE c.change_id = next.change_id \
             RETURNING c.kind \
         ) \
         SELECT kind, count(*) FROM numbered GROUP BY kind",
    )
    .bind(last)
    .bind(max)
    .fetch_all(&mut *tx)
    .await?;
    let total: i64 = numbered.iter().map(|(_, n)| n).sum();
    if total > 0 {
        sqlx::query("UPDATE change_feed SET last_position = $1").bind(last + total).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    for (kind, n) in &numbered {
        metrics::counter!("calsync_changes_total", "kind" => kind.as_str()).increment(*n as u64);
    }
    Ok(numbered)
}

/// Numbers everything committed so far (a reader or publisher calls this before reading).
pub async fn sequence_all(pool: &PgPool) -> sqlx::Result<()> {
    const RUN: i64 = 10_000;
    while sequence(pool, RUN).await?.iter().map(|(_, n)| n).sum::<i64>() == RUN {}
    Ok(())
}

/// One page of the feed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Page {
    pub changes: Vec<Change>,
    /// Pass as `after` to read on; never behind the last change in `changes`.
    pub next_cursor: Cursor,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The changes after this cursor were pruned by retention ([`prune`]).
    #[error("changes after this cursor were deleted by retention; reread your tables and start from a new cursor")]
    Expired,
    /// Ahead of anything this feed has handed out: not one of its cursors.
    #[error("not a cursor this feed gave out")]
    Unknown,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Up to `limit` changes after `after` (from the oldest kept when `None`), optionally one user's.
pub async fn read(pool: &PgPool, after: Option<Cursor>, limit: i64, user_id: Option<Uuid>) -> Result<Page, ReadError> {
    // One snapshot for the mark and the rows: everything at or below `last_position` is visible.
    let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let (last, pruned): (i64, i64) =
        sqlx::query_as("SELECT last_position, pruned_through FROM change_feed").fetch_one(&mut *tx).await?;
    let after = after.map_or(pruned, Cursor::position);
    if after < pruned {
        return Err(ReadError::Expired);
    }
    if after > last {
        return Err(ReadError::Unknown);
    }
    // Two statements, not `($2 IS NULL OR user_id = $2)`: a prepared statement's generic plan could
    // not use the per-user index for that.
    let changes: Vec<Change> = match user_id {
        None => self::after(&mut tx, Cursor(after), limit).await?,
        Some(user_id) => {
            sqlx::query_as(concat!(
                "SELECT ",
                change_columns!(),
                " FROM change_log WHERE user_id = $3 AND position > $1 ORDER BY position LIMIT $2"
            ))
            .bind(after)
            .bind(limit)
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?
        }
    };
    tx.commit().await?;
    // A short page holds everything up to the mark (for a filtered read: the user's part of it),
    // so the reader may skip to the mark and not scan other users' changes again.
    let next_cursor = match changes.last() {
        Some(last_read) if changes.len() as i64 == limit => last_read.cursor,
        _ => Cursor(last),
    };
    Ok(Page { changes, next_cursor })
}

/// The advisory lock whose holder is the push side's one publisher ("calsync" and a 2): the worker
/// that holds it publishes (worker/src/change_publisher.rs).
pub const PUBLISHER_LOCK: i64 = 0x6361_6c73_796e_6302;

/// The push side's place: everything up to it has been published and confirmed.
pub async fn published_through(conn: &mut PgConnection) -> sqlx::Result<Cursor> {
    sqlx::query_scalar("SELECT published_through FROM change_feed").fetch_one(conn).await.map(Cursor)
}

/// Up to `limit` numbered changes after `after`, in position order.
pub async fn after(conn: &mut PgConnection, after: Cursor, limit: i64) -> sqlx::Result<Vec<Change>> {
    sqlx::query_as(concat!(
        "SELECT ",
        change_columns!(),
        " FROM change_log WHERE position > $1 ORDER BY position LIMIT $2"
    ))
    .bind(after.0)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Records that everything up to `through` is published (never moves back).
pub async fn mark_published(conn: &mut PgConnection, through: Cursor) -> sqlx::Result<()> {
    sqlx::query("UPDATE change_feed SET published_through = greatest(published_through, $1)")
        .bind(through.0)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Changes committed and not yet published: numbered past `published_through`, or not numbered yet.
pub async fn unpublished(conn: &mut PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT (f.last_position - f.published_through) \
             + (SELECT count(*) FROM change_log WHERE position IS NULL) FROM change_feed f",
    )
    .fetch_one(conn)
    .await
}

/// Deletes numbered changes that occurred before `before`, at most `batch` of them (oldest
/// positions first), and moves `pruned_through` to the highest position deleted: a cursor below it
/// answers [`ReadError::Expired`], since a change after it may be gone. Returns how many.
pub async fn prune(pool: &PgPool, before: OffsetDateTime, batch: i64) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let deleted: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM change_log WHERE change_id IN ( \
             SELECT change_id FROM change_log WHERE position IS NOT NULL AND occurred_at < $1 \
             ORDER BY position LIMIT $2) \
         RETURNING position",
    )
    .bind(before)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    let Some(through) = deleted.iter().max() else { return Ok(0) };
    sqlx::query("UPDATE change_feed SET pruned_through = greatest(pruned_through, $1)")
        .bind(through)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(deleted.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_digits_and_nothing_else() {
        assert_eq!("42".parse::<Cursor>(), Ok(Cursor(42)));
        for garbled in ["", "-1", "4 2", "abc", "1e3", "99999999999999999999", "0x10"] {
            assert_eq!(garbled.parse::<Cursor>(), Err(GarbledCursor), "{garbled:?}");
        }
    }

    #[test]
    fn every_kind_is_spelled_as_the_contract_writes_it() {
        for kind in Kind::ALL {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, kind.as_str());
        }
    }
}
