//! PostgreSQL: pool, migrations, and the data access both services use.
//!
//! - [`budgets`]: `api_budgets`, each Calendly user's request window, shared by every worker.
//! - [`changes`]: `change_log`, the change feed the app reads (positions, cursor, push bookkeeping).
//! - [`connections`]: `calendar_connections` (encrypted tokens, the row lock for refreshes).
//! - [`meetings`]: `meetings` / `meeting_invitees` upserts guarded against out-of-order deliveries.
//! - [`inbox`]: `webhook_inbox`, what became of every delivery.
//! - [`oauth_states`]: single-use OAuth state for the connect flow.
//! - [`pending`]: what a callback was granted, until the app confirms it for the right user.
//! - [`retention`]: deleting what is past its retention, in small batches.
//! - [`forgotten`]: tombstones of people erased on request, which later writes honour.

pub mod budgets;
pub mod changes;
pub mod connections;
pub mod forgotten;
pub mod inbox;
pub mod meetings;
pub mod oauth_states;
pub mod pending;
pub mod retention;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::retry;

/// The schema, compiled in from `migrations/`, the only place it is defined.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Creates the database if it does not exist, then applies pending migrations. sqlx's migrator
/// holds a PostgreSQL advisory lock while it runs, so concurrent starts apply each migration once.
pub async fn prepare(url: &str, pool: &PgPool) -> anyhow::Result<()> {
    use anyhow::Context;
    if !sqlx::Postgres::database_exists(url).await.context("checking that the database exists")? {
        // Two processes may race to create it; losing that race is fine.
        if let Err(error) = sqlx::Postgres::create_database(url).await
            && !sqlx::Postgres::database_exists(url).await.unwrap_or(false)
        {
            return Err(error).context("creating the database");
        }
    }
    MIGRATOR.run(pool).await.context("applying migrations")?;
    Ok(())
}

/// A pool that exists before PostgreSQL is reachable, plus a background task that creates and
/// migrates the database as soon as it can. Ingest uses this so webhook intake never waits on
/// PostgreSQL; the worker waits for [`Database::wait_ready`] before consuming.
#[derive(Clone)]
pub struct Database {
    pool: PgPool,
    migrated: Arc<AtomicBool>,
    ready: Arc<tokio::sync::Notify>,
}

impl Database {
    pub fn start(url: &str, max_connections: u32, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // A request that needs the database fails fast (503) rather than queueing for long.
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        let db = Self { pool, migrated: Arc::default(), ready: Arc::default() };
        tokio::spawn(db.clone().migrate_until_done(url.to_owned(), shutdown));
        Ok(db)
    }

    async fn migrate_until_done(self, url: String, shutdown: CancellationToken) {
        let mut backoff = retry::reconnect();
        loop {
            match prepare(&url, &self.pool).await {
                Ok(()) => {
                    self.migrated.store(true, Ordering::Release);
                    self.ready.notify_waiters();
                    tracing::info!("database ready and migrated");
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "database not ready; retrying")
                }
            }
            let delay = backoff.next_delay().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {},
            }
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn is_migrated(&self) -> bool {
        self.migrated.load(Ordering::Acquire)
    }

    /// Waits until migrations have been applied, up to `deadline`.
    pub async fn wait_ready(&self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, async {
            while !self.is_migrated() {
                tokio::select! {
                    _ = self.ready.notified() => {},
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {},
                }
            }
        })
        .await
        .is_ok()
    }

    /// Migrated and answering a trivial query within a second.
    pub async fn is_up(&self) -> bool {
        self.is_migrated()
            && tokio::time::timeout(Duration::from_secs(1), sqlx::query("SELECT 1").execute(&self.pool))
                .await
                .is_ok_and(|r| r.is_ok())
    }
}

/// Splits `items` into rounds in which every key occurs once (round k holds the k-th occurrence of
/// each key, in order), each sorted by key. PostgreSQL refuses to update one row twice in one
/// statement, and applying the rounds in turn is exactly applying the items one by one: the
/// guards see every earlier occurrence of a key. Sorting makes concurrent batches take their row
/// locks in the same order, so they wait for each other instead of deadlocking.
pub fn rounds<T, K: Ord + Clone>(items: Vec<T>, key: impl Fn(&T) -> K) -> Vec<Vec<T>> {
    let mut seen: std::collections::BTreeMap<K, usize> = std::collections::BTreeMap::new();
    let mut rounds: Vec<Vec<T>> = Vec::new();
    for item in items {
        let occurrence = seen.entry(key(&item)).or_insert(0);
        if rounds.len() <= *occurrence {
            rounds.push(Vec::new());
        }
        rounds[*occurrence].push(item);
        *occurrence += 1;
    }
    for round in &mut rounds {
        round.sort_by_key(|item| key(item));
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::rounds;

    #[test]
    fn rounds_hold_each_key_once_in_order_of_occurrence_and_sorted() {
        let items = vec![("b", 1), ("a", 2), ("b", 3), ("c", 4), ("b", 5), ("a", 6)];
        let split = rounds(items, |(k, _)| *k);
        assert_eq!(split, vec![vec![("a", 2), ("b", 1), ("c", 4)], vec![("a", 6), ("b", 3)], vec![("b", 5)]]);
    }
}
