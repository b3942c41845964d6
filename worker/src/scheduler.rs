//! The periodic checks, scheduled once per interval however many workers run: the worker that holds
//! the scheduler's lock ([`crate::leader`]) schedules; any worker executes what it queues.
//!
//! - Subscription checks (`SUBSCRIPTION_CHECK_INTERVAL_SECS`): one job per active connection; see
//!   [`crate::subscription_check`].
//! - Reconciliation (`RECONCILE_INTERVAL_SECS`): one sync pass per active connection (the same job
//!   as a backfill), so a booking, cancel or change whose webhook never arrived is corrected.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use calsync_common::db::connections;
use calsync_common::queue::Broker;
use calsync_common::queue::message::{SyncJob, SyncKind, sync_job};

use crate::leader;

/// The advisory lock key of the scheduler ("calsync" and a 1).
const SCHEDULER_LOCK: i64 = 0x6361_6c73_796e_6301;
/// How often a worker that is not the scheduler tries to become it.
const TAKEOVER_INTERVAL: Duration = Duration::from_secs(10);
/// How often the scheduler checks that its lock connection is alive between (hour-long) ticks.
const LOCK_PING_INTERVAL: Duration = Duration::from_secs(30);

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
    let checks = schedule.checks();
    let Some(shortest) = checks.iter().map(|(_, every)| *every).min() else { return };
    while !shutdown.is_cancelled() {
        if let Some(lock) = leader::try_lead(&schedule.database_url, SCHEDULER_LOCK).await {
            tracing::info!("this worker schedules the periodic checks");
            schedule_while_holding(&schedule, &checks, lock, &shutdown).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TAKEOVER_INTERVAL.min(shortest)) => {}
        }
    }
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
        if !leader::still_leading(&mut lock).await {
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
