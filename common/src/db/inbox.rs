//! `webhook_inbox`: one row per distinct delivery, saying what became of it. Deliveries that may
//! be replayed later (`unmatched`, `awaiting_reauth`) keep their body.

use sqlx::{PgConnection, PgExecutor, PgPool};

use crate::db::rounds;
use time::OffsetDateTime;

/// `webhook_inbox.status`. The only place its spellings exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum InboxStatus {
    Processed,
    Ignored,
    Unmatched,
    AwaitingReauth,
    Dead,
}

impl InboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Ignored => "ignored",
            Self::Unmatched => "unmatched",
            Self::AwaitingReauth => "awaiting_reauth",
            Self::Dead => "dead",
        }
    }

    /// Final states: a redelivery of the same body needs no work.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Processed | Self::Ignored | Self::Dead)
    }

    fn keeps_body(self) -> bool {
        matches!(self, Self::Unmatched | Self::AwaitingReauth)
    }
}

#[derive(Debug, Clone)]
pub struct InboxRecord<'a> {
    pub message_id: &'a str,
    pub event: Option<&'a str>,
    pub created_by: Option<&'a str>,
    pub received_at: OffsetDateTime,
    pub status: InboxStatus,
    pub attempts: i32,
    pub last_error: Option<&'a str>,
    pub body: &'a [u8],
    /// The delivery's `traceparent`, kept (with the body) for a replay to continue its trace.
    pub traceparent: Option<&'a str>,
}

pub async fn status_of(pool: &PgPool, message_id: &str) -> sqlx::Result<Option<InboxStatus>> {
    sqlx::query_scalar("SELECT status FROM webhook_inbox WHERE message_id = $1")
        .bind(message_id)
        .fetch_optional(pool)
        .await
}

/// Records what became of a delivery (idempotent). `processed_at` is the wall clock at this
/// statement (not the transaction start), i.e. just before the commit that makes the rows visible.
pub async fn record(executor: impl PgExecutor<'_>, r: &InboxRecord<'_>) -> sqlx::Result<()> {
    record_round(executor, std::slice::from_ref(r)).await
}

/// [`record`] for many deliveries in one statement; a message id that occurs more than once is
/// recorded in order (one statement per occurrence: PostgreSQL updates a row once per statement).
pub async fn record_all(tx: &mut PgConnection, records: &[InboxRecord<'_>]) -> sqlx::Result<()> {
    for round in rounds(records.to_vec(), |r| r.message_id) {
        record_round(&mut *tx, &round).await?;
    }
    Ok(())
}

/// Records deliveries with distinct message ids in one statement.
async fn record_round(executor: impl PgExecutor<'_>, round: &[InboxRecord<'_>]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO webhook_inbox (message_id, event, created_by, received_at, status, attempts, last_error, \
                 processed_at, body, traceparent) \
             SELECT m, e, c, r, s, a, l, clock_timestamp(), b, t \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::int4[], $7::text[], \
                 $8::bytea[], $10::text[]) AS x(m, e, c, r, s, a, l, b, t) \
             ON CONFLICT (message_id) DO UPDATE SET status = EXCLUDED.status, \
                 attempts = GREATEST(webhook_inbox.attempts, EXCLUDED.attempts), last_error = EXCLUDED.last_error, \
                 processed_at = EXCLUDED.processed_at, body = EXCLUDED.body, traceparent = EXCLUDED.traceparent \
             -- A late duplicate (or a racing replay) never turns a processed delivery back into a parked or dead one.
             WHERE webhook_inbox.status <> $9 OR EXCLUDED.status = $9",
    )
    .bind(round.iter().map(|r| r.message_id).collect::<Vec<_>>())
    .bind(round.iter().map(|r| r.event).collect::<Vec<_>>())
    .bind(round.iter().map(|r| r.created_by).collect::<Vec<_>>())
    .bind(round.iter().map(|r| r.received_at).collect::<Vec<_>>())
    .bind(round.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
    .bind(round.iter().map(|r| r.attempts).collect::<Vec<_>>())
    .bind(round.iter().map(|r| r.last_error).collect::<Vec<_>>())
    .bind(round.iter().map(|r| r.status.keeps_body().then_some(r.body)).collect::<Vec<_>>())
    .bind(InboxStatus::Processed)
    .bind(round.iter().map(|r| r.traceparent.filter(|_| r.status.keeps_body())).collect::<Vec<_>>())
    .execute(executor)
    .await
    .map(|_| ())
}

/// Deliveries parked for `created_by` that a (re)connection should replay: every
/// `awaiting_reauth` one, and `unmatched` ones younger than `replay_days`.
/// A parked delivery to replay: its message id, body and `traceparent` (if it had one).
pub type Parked = (String, Vec<u8>, Option<String>);

pub async fn parked_for(pool: &PgPool, created_by: &str, replay_days: u32) -> sqlx::Result<Vec<Parked>> {
    sqlx::query_as(
        "SELECT message_id, body, traceparent FROM webhook_inbox \
         WHERE created_by = $1 AND body IS NOT NULL \
           AND (status = $3 OR (status = $4 AND received_at > now() - make_interval(days => $2))) \
         ORDER BY received_at",
    )
    .bind(created_by)
    .bind(replay_days as i32)
    .bind(InboxStatus::AwaitingReauth)
    .bind(InboxStatus::Unmatched)
    .fetch_all(pool)
    .await
}

/// Forgets that `message_id` died, so its revived dead letter is not taken for a duplicate.
pub async fn forget_dead(pool: &PgPool, message_id: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM webhook_inbox WHERE message_id = $1 AND status = $2")
        .bind(message_id)
        .bind(InboxStatus::Dead)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Rows per status, for operators and the demo.
pub async fn counts(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT status, count(*) FROM webhook_inbox GROUP BY status ORDER BY status").fetch_all(pool).await
}
