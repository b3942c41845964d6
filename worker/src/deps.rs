//! What processing needs, built once per process and shared by every in-flight delivery.

use std::time::Duration;

use sqlx::PgPool;

use calsync_common::calendly::CalendlyClient;
use calsync_common::calendly::types::ScheduledEvent;
use calsync_common::crypto::TokenCipher;
use uuid::Uuid;

use crate::settings::WorkerSettings;

use crate::single_flight::SingleFlight;

/// In-flight event fetches by (connection, event URI), for [`crate::fetch`]. Keyed by connection so
/// one user's token never answers for another's delivery.
pub type EventFetches = SingleFlight<(Uuid, String), ScheduledEvent>;

/// In-flight token refreshes in this process by (connection, Calendly account, rejected token), for
/// [`crate::tokens`]: deliveries of one user waiting for one refresh wait on it here, not each by
/// polling the database.
pub type Refreshes = SingleFlight<(Uuid, Option<String>, Option<String>), crate::access_token::AccessToken>;

pub struct Deps {
    pub pool: PgPool,
    pub calendly: CalendlyClient,
    pub cipher: TokenCipher,
    /// Failed attempts after which a message is dead-lettered.
    pub max_attempts: u32,
    /// Backfill window start, counted back from now.
    pub sync_lookback: Duration,
    /// Shares one Calendly fetch among concurrent deliveries about the same event.
    pub event_fetches: EventFetches,
    /// Shares one token refresh among concurrent deliveries of the same connection.
    pub refreshes: Refreshes,
    /// Closed while PostgreSQL is unreachable: the consumers pause.
    pub db_gate: crate::db_gate::DbGate,
    /// Each Calendly user's API budget in this process.
    pub budgets: crate::budget::Budgets,
    /// `CALENDLY_WEBHOOK_CALLBACK_URL`: where a replacement subscription points (unset: where the
    /// broken one pointed).
    pub callback_url: Option<url::Url>,
    /// The database stage: deliveries' rows, written in batches.
    pub writer: crate::writer::Writer,
}

impl Deps {
    pub fn new(settings: &WorkerSettings, pool: PgPool) -> anyhow::Result<Self> {
        Ok(Self {
            calendly: CalendlyClient::new(&settings.shared.calendly)?,
            cipher: TokenCipher::from_settings(&settings.shared.token_keys)?,
            max_attempts: settings.worker_max_attempts,
            sync_lookback: Duration::from_secs(u64::from(settings.sync_lookback_days) * 86_400),
            event_fetches: EventFetches::default(),
            refreshes: Refreshes::default(),
            db_gate: crate::db_gate::DbGate::default(),
            budgets: crate::budget::Budgets::default(),
            callback_url: settings.callback_url().cloned(),
            writer: crate::writer::Writer::start(pool.clone(), settings.batching()),
            pool,
        })
    }
}
