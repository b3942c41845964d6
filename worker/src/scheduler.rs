//! The periodic checks, scheduled once per interval however many workers run: the worker that holds
//! a PostgreSQL advisory lock (on a connection of its own, outside the pool) schedules; any worker
//! executes what it queues. If the scheduler dies, its connection closes, the lock is released and
//! another worker takes over at its next try.
//!
//! - Subscription checks (`SUBSCRIPTION_CHECK_INTERVAL_SECS`): one job per active connection; see
//!   [`crate::subscription_check`].
//! - Reconciliation (`RECONCILE_INTERVAL_SECS`): one sync pass per active connection (the same job
//!   as a backfill), so a booking, cancel or change whose webhook never arrived is corrected.
//!
//! Every worker (scheduler or not) also keeps `calsync_subscriptions{state}` current from the
//! table, so whichever one is scraped tells the truth.

use std::time::Duration;

use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use calsync_common::db::connections::{self, SubscriptionState};
use calsync_common::queue::Broker;
use calsync_common::queue::message::{SyncJob, SyncKind, sync_job};

/// The advisory lock key of the scheduler ("calsync" and a 1).
const SCHEDULER_LOCK: i64 = 0x6361_6c73_796e_6301;
/// How often a worker that is not the scheduler tries to become it.
const TAKEOVER_INTERVAL: Duration = Duration::from_secs(10);
/// How often the scheduler checks that its lock connection is alive between (hour-long) ticks,
/// and how long that check may take.
const LOCK_PING_INTERVAL: Duration = Duration::from_secs(30);
const LOCK_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How often every worker refreshes `calsync_subscriptions{state}` from the table.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Schedule {
    pub database_url: String,
    pub pool: PgPool,
    pub broker: Broker,
    /// `RECONCILE_INTERVAL_SECS`; zero turns reconciliation off.
    pub reconcile_every: Duration,
    /// `SUBSCRIPTION_CHECK_INTERVAL_SECS`; zero turns subscription checks off.
    pub check_subscriptions_every: Duration,
}

impl Schedule {
    /// The checks that are on, each with its interval.
    fn checks(&self) -> Vec<(SyncKind, Duration)> {
        [(SyncKind::CheckSubscription, self.check_subscriptions_every), (SyncKind::Reconcile, self.reconcile_every)]
            .into_iter()
            .filter(|(_, every)| !every.is_zero())
            .collect()
    }
}

pub async fn run(schedule: Schedule, shutdown: CancellationToken) {
    if !schedule.check_subscriptions_every.is_zero() {
        tokio::spawn(keep_subscription_gauge(schedule.pool.clone(), shutdown.clone()));
    }
    let checks = schedule.checks();
    let Some(shortest) = checks.iter().map(|(_, every)| *every).min() else { return };
    while !shutdown.is_cancelled() {
        if let Some(lock) = become_scheduler(&schedule.database_url).await {
            tracing::info!("this worker schedules the periodic checks");
            schedule_while_holding(&schedule, &checks, lock, &shutdown).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TAKEOVER_INTERVAL.min(shortest)) => {}
        }
    }
}

/// A connection holding the scheduler lock, or `None` when another worker holds it.
async fn become_scheduler(database_url: &str) -> Option<PgConnection> {
    let mut connection = PgConnection::connect(database_url).await.ok()?;
    // The connection idles between ticks. If the network to it dies without a word, PostgreSQL
    // would keep the session (and the lock) until its TCP keepalives give up — two hours by
    // default, with nobody scheduling meanwhile. These make the server drop a dead peer within
    // about a minute, so the lock is free for another worker.
    sqlx::raw_sql("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3")
        .execute(&mut connection)
        .await
        .ok()?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SCHEDULER_LOCK)
        .fetch_one(&mut connection)
        .await
        .ok()?;
    locked.then_some(connection)
}

async fn schedule_while_holding(
    schedule: &Schedule,
    checks: &[(SyncKind, Duration)],
    mut lock: PgConnection,
    shutdown: &CancellationToken,
) {
    let mut ticks: Vec<_> = checks
        .iter()
        .map(|(kind, every)| {
            // The first tick is one interval away: a new connection was just set up and backfilled,
            // and a worker taking over need not repeat what the last scheduler just did.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + *every, *every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            (*kind, tick)
        })
        .collect();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + LOCK_PING_INTERVAL, LOCK_PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        let due = {
            let next = futures_util::future::select_all(ticks.iter_mut().map(|(kind, tick)| {
                let kind = *kind;
                Box::pin(async move {
                    tick.tick().await;
                    kind
                })
            }));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                (kind, _, _) = next => Some(kind),
                _ = ping.tick() => None,
            }
        };
        // Still the scheduler? If this connection died, so did the lock: let someone take over.
        // Checked between ticks too, so a dead session is noticed in seconds, not at the next tick.
        let alive = tokio::time::timeout(LOCK_PING_TIMEOUT, sqlx::query("SELECT 1").execute(&mut lock)).await;
        if !matches!(alive, Ok(Ok(_))) {
            tracing::warn!("lost the scheduler lock's connection; stepping down");
            return;
        }
        let Some(due) = due else { continue };
        match queue_for_every_connection(&schedule.pool, &schedule.broker, due).await {
            Ok(queued) => tracing::debug!(queued, job = due.as_str(), "periodic check scheduled"),
            Err(error) => tracing::warn!(%error, job = due.as_str(), "could not schedule a periodic check"),
        }
    }
}

/// One `kind` job per active connection.
async fn queue_for_every_connection(pool: &PgPool, broker: &Broker, kind: SyncKind) -> anyhow::Result<usize> {
    let active = connections::active_ids(pool).await?;
    for connection_id in &active {
        broker.publish(&sync_job(&SyncJob::new(*connection_id, kind))).await?;
        metrics::counter!("calsync_scheduler_jobs_total", "job" => kind.as_str()).increment(1);
    }
    Ok(active.len())
}

/// `calsync_subscriptions{state}`: active connections by what their last subscription check found.
async fn keep_subscription_gauge(pool: PgPool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(counts) = connections::count_by_subscription_state(&pool).await else { continue };
        for state in SubscriptionState::ALL {
            let n = counts.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
            metrics::gauge!("calsync_subscriptions", "state" => state.as_str()).set(n as f64);
        }
    }
}
