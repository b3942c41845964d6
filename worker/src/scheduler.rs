//! The periodic checks, scheduled once per interval however many workers run: the worker that holds
//! the scheduler's lock ([`crate::leader`]) schedules; any worker executes what it queues.
//!
//! - Subscription checks (`SUBSCRIPTION_CHECK_INTERVAL_SECS`): one job per active connection; see
//!   [`crate::subscription_check`].
//! - Reconciliation (`RECONCILE_INTERVAL_SECS`): one sync pass per active connection (the same job
//!   as a backfill), so a booking, cancel or change whose webhook never arrived is corrected.
//! - Retention (`RETENTION_INTERVAL_SECS`): run here, by the scheduler itself; see
//!   [`crate::retention`].

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use calsync_common::db::connections;
use calsync_common::queue::Broker;
use calsync_common::queue::message::{SyncJob, SyncKind, sync_job};

use crate::{leader, retention};

/// The advisory lock key of the scheduler ("calsync" and a 1).
const SCHEDULER_LOCK: i64 = 0x6361_6c73_796e_6301;
/// How often a worker that is not the scheduler tries to become it.
const TAKEOVER_INTERVAL: Duration = Duration::from_secs(10);
/// The longest a new scheduler waits before its first retention pass.
const RETENTION_FIRST_PASS: Duration = Duration::from_secs(60);
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
    /// `RETENTION_INTERVAL_SECS`; zero turns retention off.
    pub retention_every: Duration,
    pub retention: retention::Policy,
}

/// What the scheduler does at a tick.
#[derive(Debug, Clone, Copy)]
enum Task {
    /// Queue one job of this kind per active connection (any worker runs them).
    Jobs(SyncKind),
    /// Delete what is past its retention (the scheduler itself, in small batches).
    Retention,
}

impl Task {
    fn as_str(self) -> &'static str {
        match self {
            Self::Jobs(kind) => kind.as_str(),
            Self::Retention => "retention",
        }
    }
}

impl Schedule {
    /// The tasks that are on, each with its interval.
    fn tasks(&self) -> Vec<(Task, Duration)> {
        [
            (Task::Jobs(SyncKind::CheckSubscription), self.check_subscriptions_every),
            (Task::Jobs(SyncKind::Reconcile), self.reconcile_every),
            (Task::Retention, self.retention_every),
        ]
        .into_iter()
        .filter(|(_, every)| !every.is_zero())
        .collect()
    }
}

pub async fn run(schedule: Schedule, shutdown: CancellationToken) {
    let tasks = schedule.tasks();
    let Some(shortest) = tasks.iter().map(|(_, every)| *every).min() else { return };
    while !shutdown.is_cancelled() {
        if let Some(lock) = leader::try_lead(&schedule.database_url, SCHEDULER_LOCK).await {
            tracing::info!("this worker schedules the periodic checks");
            schedule_while_holding(&schedule, &tasks, lock, &shutdown).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TAKEOVER_INTERVAL.min(shortest)) => {}
        }
    }
}

async fn schedule_while_holding(
    schedule: &Schedule,
    tasks: &[(Task, Duration)],
    mut lock: PgConnection,
    shutdown: &CancellationToken,
) {
    let mut ticks: Vec<_> = tasks
        .iter()
        .map(|(task, every)| {
            // The first check is one interval away: a new connection was just set up and backfilled,
            // and a worker taking over need not repeat what the last scheduler just did. Retention
            // starts within a minute: a fleet redeployed more often than its interval must still prune.
            let first = match task {
                Task::Jobs(_) => *every,
                Task::Retention => (*every).min(RETENTION_FIRST_PASS),
            };
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, *every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            (*task, tick)
        })
        .collect();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + LOCK_PING_INTERVAL, LOCK_PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        let due = {
            let next = futures_util::future::select_all(ticks.iter_mut().map(|(task, tick)| {
                let task = *task;
                Box::pin(async move {
                    tick.tick().await;
                    task
                })
            }));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                (task, _, _) = next => Some(task),
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
        let done = match due {
            Task::Jobs(kind) => queue_for_every_connection(&schedule.pool, &schedule.broker, kind).await,
            Task::Retention => retention::run_once(&schedule.pool, &schedule.retention)
                .await
                .map(|deleted| {
                    tracing::info!(?deleted, "retention pass done");
                    0
                })
                .map_err(Into::into),
        };
        match done {
            Ok(queued) => tracing::debug!(queued, task = due.as_str(), "periodic task done"),
            Err(error) => tracing::warn!(%error, task = due.as_str(), "a periodic task failed"),
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
