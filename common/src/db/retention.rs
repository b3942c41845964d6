//! Deleting what calsync no longer needs (ARCHITECTURE.md, "Retention"), in small batches: each
//! batch is its own short statement that skips rows another transaction holds, so pruning a large
//! table never makes a delivery wait on a lock, and never holds one for long itself.

use sqlx::PgPool;
use time::OffsetDateTime;

use crate::db::inbox::InboxStatus;

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// Deletes inbox rows in `statuses` received before `before`, batch by batch; returns how many.
pub async fn prune_inbox(pool: &PgPool, statuses: &[InboxStatus], before: OffsetDateTime) -> sqlx::Result<u64> {
    let mut deleted = 0;
    loop {
        let done = sqlx::query(
            "DELETE FROM webhook_inbox WHERE message_id IN ( \
                 SELECT message_id FROM webhook_inbox WHERE status = ANY($1) AND received_at < $2 \
                 LIMIT $3 FOR UPDATE SKIP LOCKED)",
        )
        .bind(statuses)
        .bind(before)
        .bind(BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        deleted += done;
        if done < BATCH as u64 {
            return Ok(deleted);
        }
    }
}
