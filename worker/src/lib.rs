//! calsync-worker: turns queued webhooks into the right user's meetings.
//!
//! - [`settings`]: the worker's settings (its own, plus the groups shared with ingest).
//! - [`consumer`]: AMQP only — consume, hand over, settle (ack / delayed retry / dead letter).
//! - [`process`]: one webhook to rows, with no AMQP types; returns an [`outcome::Outcome`].
//! - [`sync`]: sync passes (backfill, resync, reconciliation) from `calsync.sync`, resumable.
//! - [`scheduler`]: the periodic checks (subscriptions, reconciliation), scheduled by one worker.
//! - [`change_publisher`]: the push side of the change feed (`calsync.changes`), one worker at a time.
//! - [`leader`]: one worker at a time, by a PostgreSQL advisory lock.
//! - [`gauges`]: fleet-wide gauges every worker reads from the tables.
//! - [`retention`]: the retention pass (inbox, changes, OAuth states), run by the scheduler.
//! - [`outcome`]: what becomes of a delivery, decided once for webhooks and sync jobs.
//! - [`error`]: transient / permanent / needs-reauth, decided by type.
//! - [`calendly_call`]: `CalendlyCalls`, the one way to call Calendly as a user (401 → refresh once,
//!   429, retries, the budget).
//! - [`budget`]: each Calendly user's API and token budgets, shared by the fleet through PostgreSQL.
//! - [`subscription_check`]: reads a connection's subscription and replaces a broken one.
//! - [`tokens`]: `Tokens`, the connection's token, refreshed once per expiry under a refresh lease.
//! - [`access_token`]: the token as held in memory.
//! - [`fetch`]: `EventFetcher`, the scheduled-event fetch, shared among concurrent deliveries for one event.
//! - [`single_flight`]: one execution per key at a time, generic.
//! - [`resolver`]: whose delivery it is (connection of `created_by`, inbox status), looked up for
//!   many deliveries in one statement.
//! - [`batched`]: many concurrent callers' questions answered in one round trip, generic (the
//!   resolver's lookups, the budget's takes).
//! - [`writer`]: the database stage: deliveries' rows written in batches, acked after the commit.
//! - [`deps`]: the handles processing uses (each owns its state), built once per process; steps
//!   take or destructure the ones they touch.
//! - [`db_gate`]: pauses consumption while PostgreSQL is unreachable.
//! - [`admin`]: the operator subcommands' work, one file per command.

pub mod access_token;
pub mod admin;
pub mod batched;
pub mod budget;
pub mod calendly_call;
pub mod change_publisher;
pub mod consumer;
pub mod db_gate;
pub mod deps;
pub mod error;
pub mod fetch;
pub mod gauges;
pub mod leader;
pub mod outcome;
pub mod process;
pub mod resolver;
pub mod retention;
pub mod scheduler;
pub mod series;
pub mod settings;
pub mod single_flight;
pub mod subscription_check;
pub mod sync;
pub mod tokens;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use calsync_common::db::Database;
use calsync_common::health;
use calsync_common::queue::{Broker, BrokerConfig, RetryTarget};

pub use deps::Deps;
use settings::WorkerSettings;

pub struct Worker {
    settings: WorkerSettings,
    deps: Arc<Deps>,
    broker: Broker,
    database: Database,
    listener: TcpListener,
    shutdown: CancellationToken,
}

impl Worker {
    pub async fn build(settings: WorkerSettings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        settings.validate_for_consuming()?;
        calsync_common::telemetry::metrics_handle();
        series::register();
        let listener = calsync_common::http::listen(&settings.worker_addr, "WORKER_ADDR").await?;
        let database =
            Database::start(&settings.shared.database.database_url, settings.db_pool_size(), shutdown.clone())?;
        let broker = Broker::start(BrokerConfig::from_args(&settings.shared.amqp, "calsync-worker"));
        let deps = Arc::new(Deps::new(&settings, database.pool().clone(), broker.clone())?);
        Ok(Self { settings, deps, broker, database, listener, shutdown })
    }

    pub fn health_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let addr = self.health_addr();
        let health = health::router(health::Probe {
            broker: self.broker.clone(),
            database: self.database.clone(),
            database_required: true,
            token_keys: Some(self.deps.key_failures.clone()),
        });
        let stop_health = self.shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(self.listener, health)
                .with_graceful_shutdown(async move { stop_health.cancelled().await })
                .await
        });
        tracing::info!(%addr, concurrency = self.settings.worker_concurrency, "calsync-worker started");

        // Consuming before the schema exists would only produce retries.
        while !self.shutdown.is_cancelled() && !self.database.wait_ready(Duration::from_secs(1)).await {}
        tokio::spawn(self.deps.db_gate.clone().watch(self.database.clone(), self.shutdown.clone()));
        let schedule = scheduler::Schedule {
            database_url: self.settings.shared.database.database_url.clone(),
            pool: self.database.pool().clone(),
            broker: self.broker.clone(),
            reconcile_every: Duration::from_secs(self.settings.reconcile_interval_secs),
            check_subscriptions_every: Duration::from_secs(self.settings.subscription_check_interval_secs),
            retention_every: Duration::from_secs(self.settings.retention_interval_secs),
            retention: self.settings.retention(),
        };
        let subscriptions_checked = self.settings.subscription_check_interval_secs > 0;
        tokio::spawn(gauges::keep_current(self.database.pool().clone(), subscriptions_checked, self.shutdown.clone()));
        tokio::spawn(scheduler::run(schedule, self.shutdown.clone()));
        let changes = change_publisher::ChangePublisher {
            database_url: self.settings.shared.database.database_url.clone(),
            pool: self.database.pool().clone(),
            broker: self.broker.clone(),
        };
        tokio::spawn(change_publisher::run(changes, self.shutdown.clone()));
        let grace = Duration::from_secs(self.settings.worker_shutdown_grace_secs);
        let webhooks = consumer::ConsumerConfig {
            target: RetryTarget::Webhooks,
            concurrency: self.settings.worker_concurrency,
            grace,
        };
        // Backfills get a small share so they never crowd out live webhooks.
        let sync = consumer::ConsumerConfig {
            target: RetryTarget::Sync,
            concurrency: (self.settings.worker_concurrency / 8).max(1),
            grace,
        };
        tokio::join!(
            consumer::run(self.deps.clone(), self.broker.clone(), webhooks, self.shutdown.clone()),
            consumer::run(self.deps.clone(), self.broker.clone(), sync, self.shutdown.clone()),
        );
        self.broker.close().await;
        let _ = server.await;
        tracing::info!("calsync-worker stopped");
        Ok(())
    }
}
