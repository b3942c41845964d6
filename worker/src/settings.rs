//! Settings of `calsync-worker`: its own variables plus the groups it shares with ingest
//! ([`calsync_common::config`]).

use clap::Args;

use calsync_common::config::{ConfigError, OptionalUrl, SharedArgs, optional_url, present};

/// Settings of `calsync-worker`.
#[derive(Args, Clone, Debug)]
pub struct WorkerSettings {
    /// Deliveries processed at once (also the AMQP prefetch).
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 32)]
    pub worker_concurrency: u16,

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, env = "WORKER_ADDR", default_value = "0.0.0.0:9090")]
    pub worker_addr: String,

    /// Deliveries written together in one transaction at most (1 = one transaction each).
    #[arg(long, env = "WORKER_BATCH_SIZE", default_value_t = 64)]
    pub worker_batch_size: usize,

    /// How long the first delivery of a batch waits for others before its batch commits anyway.
    #[arg(long, env = "WORKER_BATCH_MAX_WAIT_MS", default_value_t = 5)]
    pub worker_batch_max_wait_ms: u64,

    /// Failed attempts after which a message goes to `calsync.dead`.
    #[arg(long, env = "WORKER_MAX_ATTEMPTS", default_value_t = 8)]
    pub worker_max_attempts: u32,

    /// Backfill starts this many days back (and has no upper bound).
    #[arg(long, env = "SYNC_LOOKBACK_DAYS", default_value_t = 30)]
    pub sync_lookback_days: u32,

    /// Every this many seconds each active connection is reconciled with Calendly (a sync job);
    /// 0 turns it off. One worker schedules, however many run.
    #[arg(long, env = "RECONCILE_INTERVAL_SECS", default_value_t = 3600)]
    pub reconcile_interval_secs: u64,

    /// Every this many seconds each active connection's subscription is read from Calendly, and a
    /// disabled or missing one is replaced (then the connection resynced); 0 turns it off.
    #[arg(long, env = "SUBSCRIPTION_CHECK_INTERVAL_SECS", default_value_t = 900)]
    pub subscription_check_interval_secs: u64,

    /// How often the scheduler deletes what is past its retention (0 = never).
    #[arg(long, env = "RETENTION_INTERVAL_SECS", default_value_t = 3600)]
    pub retention_interval_secs: u64,

    /// Days `processed` / `ignored` deliveries are kept (at least 2: Calendly retries a delivery for
    /// 24 hours, and a retry must still be recognised as a duplicate).
    #[arg(long, env = "INBOX_RETENTION_DAYS", default_value_t = 30)]
    pub inbox_retention_days: u32,

    /// Days `awaiting_reauth` deliveries (with their bodies) wait for their user to reconnect.
    #[arg(long, env = "PARKED_RETENTION_DAYS", default_value_t = 30)]
    pub parked_retention_days: u32,

    /// Days `dead` deliveries (with their bodies) are kept.
    #[arg(long, env = "DEAD_RETENTION_DAYS", default_value_t = 30)]
    pub dead_retention_days: u32,

    /// Days the change feed keeps a change (an older cursor answers `409 cursor_expired`).
    #[arg(long, env = "CHANGES_RETENTION_DAYS", default_value_t = 7)]
    pub changes_retention_days: u32,

    /// Where replacement and imported subscriptions point (ingest's public webhook URL); unset:
    /// where the subscription being replaced pointed (and `import-connections` refuses to run).
    #[arg(long, env = "CALENDLY_WEBHOOK_CALLBACK_URL", value_parser = optional_url)]
    pub calendly_webhook_callback_url: Option<OptionalUrl>,

    /// How long in-flight deliveries may take to finish after SIGTERM before they are requeued.
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE_SECS", default_value_t = 20, hide = true)]
    pub worker_shutdown_grace_secs: u64,

    #[command(flatten)]
    pub shared: SharedArgs,
    #[command(flatten)]
    pub inbox: calsync_common::config::InboxArgs,
}

impl WorkerSettings {
    /// PostgreSQL connections per worker process. A delivery holds one only for its short database
    /// steps (never across the Calendly call), so a quarter of the concurrency is plenty; the cap
    /// keeps a scaled-out pool within PostgreSQL's default `max_connections` (100), and PostgreSQL
    /// on few cores is faster with fewer connections anyway (see BENCHMARKS.md).
    pub fn callback_url(&self) -> Option<&url::Url> {
        self.calendly_webhook_callback_url.as_ref().and_then(|u| u.0.as_ref())
    }

    /// How the database stage batches (see [`crate::writer`]). Half the pool may be committing
    /// batches at once; the rest serves lookups, refresh leases and sync jobs.
    pub fn batching(&self) -> crate::writer::BatchConfig {
        crate::writer::BatchConfig {
            size: self.worker_batch_size,
            max_wait: std::time::Duration::from_millis(self.worker_batch_max_wait_ms),
            concurrent: (self.db_pool_size() / 2).max(1) as usize,
        }
    }

    pub fn db_pool_size(&self) -> u32 {
        (u32::from(self.worker_concurrency) / 4).clamp(4, 16)
    }

    /// How long each kind of row is kept (`*_RETENTION_DAYS`, `INBOX_REPLAY_DAYS`).
    pub fn retention(&self) -> crate::retention::Policy {
        crate::retention::Policy::from_days(
            self.inbox_retention_days,
            self.inbox.inbox_replay_days,
            self.parked_retention_days,
            self.dead_retention_days,
            self.changes_retention_days,
        )
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.shared.validate()?;
        if self.worker_concurrency == 0 {
            return Err(ConfigError::Invalid("WORKER_CONCURRENCY", "must be at least 1".into()));
        }
        if self.worker_batch_size == 0 {
            return Err(ConfigError::Invalid("WORKER_BATCH_SIZE", "must be at least 1".into()));
        }
        if self.worker_max_attempts == 0 {
            return Err(ConfigError::Invalid("WORKER_MAX_ATTEMPTS", "must be at least 1".into()));
        }
        if self.inbox_retention_days < 2 {
            return Err(ConfigError::Invalid(
                "INBOX_RETENTION_DAYS",
                format!(
                    "is {}, must be at least 2: Calendly retries a delivery for 24 hours, and a retry must still \
                     be recognised as a duplicate",
                    self.inbox_retention_days
                ),
            ));
        }
        for (name, days) in [
            ("PARKED_RETENTION_DAYS", self.parked_retention_days),
            ("DEAD_RETENTION_DAYS", self.dead_retention_days),
            ("CHANGES_RETENTION_DAYS", self.changes_retention_days),
        ] {
            if days == 0 {
                return Err(ConfigError::Invalid(name, "must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// Fail closed for consuming: without the OAuth client, the first expiring token would turn into
    /// dead letters instead of a refresh, so the worker refuses to start. (Operator subcommands
    /// that never refresh do not need it.)
    pub fn validate_for_consuming(&self) -> Result<(), ConfigError> {
        self.validate()?;
        let calendly = &self.shared.calendly;
        if calendly.calendly_oauth_client_id.as_deref().is_none_or(|id| id.trim().is_empty()) {
            return Err(ConfigError::Missing("CALENDLY_OAUTH_CLIENT_ID"));
        }
        if present(&calendly.calendly_oauth_client_secret).is_none() {
            return Err(ConfigError::Missing("CALENDLY_OAUTH_CLIENT_SECRET"));
        }
        Ok(())
    }
}
