//! The periodic checks, scheduled once per interval however many workers run: the worker that holds
//! a PostgreSQL advisory lock (on a connection of its own, outside the pool) schedules; any worker
//! executes what it queues. If the scheduler dies, its connection closes, the lock is released and
//! another worker takes over at its next try.
//!
//! Reconciliation is the sync job (the same as a backfill): it lists the connection's events from
//! the look-back window on and writes what differs, so a booking, cancel or change whose webhook
//! never arrived is corrected by the next pass.

use std::time::Duration;

use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use calsync_common::db::connections::ConnectionStatus;
use calsync_common::queue::Broker;
use calsync_common::queue::message::{SyncJob, sync_job};

/// The advisory lock key of the scheduler ("calsync" and a 1).
const SCHEDULER_LOCK: i64 = 0x6361_6c73_796e_6301;
/// How often a worker that is not the scheduler tries to become it.
const TAKEOVER_INTERVAL: Duration = Duration::from_secs(10);

pub struct Schedule {
    pub database_url: String,
    pub pool: PgPool,
    pub broker: Broker,
    /// `RECONCILE_INTERVAL_SECS`; zero turns reconciliation off.
    pub reconcile_every: Duration,
}

pub async fn run(schedule: Schedule, shutdown: CancellationToken) {
    if schedule.reconcile_every.is_zero() {
        return;
    }
    while !shutdown.is_cancelled() {
        if let Some(lock) = become_scheduler(&schedule.database_url).await {
            tracing::info!("this worker schedules the periodic checks");
            schedule_while_holding(&schedule, lock, &shutdown).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TAKEOVER_INTERVAL.min(schedule.reconcile_every)) => {}
        }
    }
}

/// A connection holding the scheduler lock, or `None` when another worker holds it.
async fn become_scheduler(database_url: &str) -> Option<PgConnection> {
    let mut connection = PgConnection::connect(database_url).await.ok()?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SCHEDULER_LOCK)
        .fetch_one(&mut connection)
        .await
        .ok()?;
    locked.then_some(connection)
}

async fn schedule_while_holding(schedule: &Schedule, mut lock: PgConnection, shutdown: &CancellationToken) {
    let mut tick = tokio::time::interval(schedule.reconcile_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    tick.tick().await; // the first tick is immediate; a new connection's backfill just ran anyway
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Still the scheduler? If this connection died, so did the lock: let someone take over.
        if sqlx::query("SELECT 1").execute(&mut lock).await.is_err() {
            tracing::warn!("lost the scheduler lock's connection; stepping down");
            return;
        }
        match queue_reconciliation(&schedule.pool, &schedule.broker).await {
            Ok(queued) => tracing::debug!(queued, "reconciliation scheduled"),
            Err(error) => tracing::warn!(%error, "could not schedule reconciliation"),
        }
    }
}

/// One sync job per active connection.
async fn queue_reconciliation(pool: &PgPool, broker: &Broker) -> anyhow::Result<usize> {
    let active: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM calendar_connections WHERE status = $1")
        .bind(ConnectionStatus::Active)
        .fetch_all(pool)
        .await?;
    for connection_id in &active {
        broker.publish(&sync_job(&SyncJob { connection_id: *connection_id })).await?;
        metrics::counter!("calsync_scheduler_jobs_total", "job" => "reconcile").increment(1);
    }
    Ok(active.len())
}
