//! The retention pass the scheduler runs every `RETENTION_INTERVAL_SECS` (ARCHITECTURE.md,
//! "Retention"): what is past its time is deleted in small batches
//! ([`calsync_common::db::retention`]) and counted in `calsync_retention_deleted_total{table}`.
//!
//! - `processed` / `ignored` deliveries after `INBOX_RETENTION_DAYS` (at least 2: Calendly retries a
//!   delivery for 24 hours, and a retry must still be recognised as a duplicate until then);
//! - `unmatched` deliveries after `INBOX_REPLAY_DAYS` (they can no longer be replayed);
//! - `awaiting_reauth` deliveries after `PARKED_RETENTION_DAYS`, `dead` ones after
//!   `DEAD_RETENTION_DAYS`, with their bodies;
//! - changes after `CHANGES_RETENTION_DAYS` (a reader's older cursor then answers `409`);
//! - OAuth states a day past their expiry.

use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;

use calsync_common::db::inbox::InboxStatus;
use calsync_common::db::{changes, oauth_states, retention};

/// How long each kind of row is kept.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub inbox: Duration,
    pub unmatched: Duration,
    pub parked: Duration,
    pub dead: Duration,
    pub changes: Duration,
}

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 86_400)
}

impl Policy {
    pub fn from_days(inbox: u32, unmatched: u32, parked: u32, dead: u32, changes: u32) -> Self {
        Self {
            inbox: days(inbox),
            unmatched: days(unmatched),
            parked: days(parked),
            dead: days(dead),
            changes: days(changes),
        }
    }
}

/// What one pass deleted, per table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub webhook_inbox: u64,
    pub change_log: u64,
    pub oauth_states: u64,
}

/// One retention pass, now.
pub async fn run_once(pool: &PgPool, policy: &Policy) -> sqlx::Result<Deleted> {
    let now = OffsetDateTime::now_utc();
    let before = |keep: Duration| now - keep;
    let mut deleted = Deleted::default();
    for (statuses, keep) in [
        (&[InboxStatus::Processed, InboxStatus::Ignored][..], policy.inbox),
        (&[InboxStatus::Unmatched], policy.unmatched),
        (&[InboxStatus::AwaitingReauth], policy.parked),
        (&[InboxStatus::Dead], policy.dead),
    ] {
        deleted.webhook_inbox += retention::prune_inbox(pool, statuses, before(keep)).await?;
    }
    loop {
        let n = changes::prune(pool, before(policy.changes), retention::BATCH).await?;
        deleted.change_log += n;
        if n == 0 {
            break;
        }
    }
    deleted.oauth_states = oauth_states::purge_stale(pool).await?;
    for (table, n) in [
        ("webhook_inbox", deleted.webhook_inbox),
        ("change_log", deleted.change_log),
        ("oauth_states", deleted.oauth_states),
    ] {
        metrics::counter!("calsync_retention_deleted_total", "table" => table).increment(n);
    }
    Ok(deleted)
}
