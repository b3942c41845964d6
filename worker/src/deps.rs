//! What processing needs, built once per process and shared by every in-flight delivery: a few
//! handles that own their state (tokens, Calendly calls with their budgets, the event fetcher, the
//! writer) and the settings steps read. Steps take the handles they use.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use calsync_common::calendly::CalendlyClient;
use calsync_common::crypto::{KeyFailures, TokenCipher};
use calsync_common::queue::Broker;

use crate::budget::Budgets;
use crate::calendly_call::CalendlyCalls;
use crate::db_gate::DbGate;
use crate::fetch::EventFetcher;
use crate::resolver::Resolver;
use crate::settings::WorkerSettings;
use crate::tokens::Tokens;
use crate::writer::Writer;

pub struct Deps {
    pub pool: PgPool,
    /// Calendly as a user: token, budget, retries (and through it, [`Tokens`]).
    pub calls: CalendlyCalls,
    /// The event a webhook is about, shared among concurrent deliveries.
    pub events: EventFetcher,
    /// Whose delivery it is, looked up for many deliveries at once.
    pub resolver: Resolver,
    /// The database stage: deliveries' rows, written in batches.
    pub writer: Writer,
    /// Closed while PostgreSQL is unreachable: the consumers pause.
    pub db_gate: DbGate,
    /// Stored tokens naming a key this process lacks (for readiness).
    pub key_failures: KeyFailures,
    /// Failed attempts after which a message is dead-lettered.
    pub max_attempts: u32,
    /// Backfill window start, counted back from now.
    pub sync_lookback: Duration,
    /// `CALENDLY_WEBHOOK_CALLBACK_URL`: where a replacement subscription points (unset: where the
    /// broken one pointed).
    pub callback_url: Option<url::Url>,
    /// Republishes parked deliveries of an active connection (the periodic check's catch-up).
    pub broker: Broker,
    /// `INBOX_REPLAY_DAYS`: how old an `unmatched` delivery may be and still be replayed.
    pub replay_days: u32,
}

impl Deps {
    pub fn new(settings: &WorkerSettings, pool: PgPool, broker: Broker) -> anyhow::Result<Self> {
        let calendly = CalendlyClient::new(&settings.shared.calendly)?;
        let cipher = Arc::new(TokenCipher::from_settings(&settings.shared.token_keys)?);
        let key_failures = cipher.failures();
        let budgets = Budgets::new(pool.clone());
        let tokens = Tokens::new(pool.clone(), calendly.clone(), cipher, budgets.clone());
        let calls = CalendlyCalls::new(calendly, tokens, budgets);
        Ok(Self {
            events: EventFetcher::new(calls.clone()),
            calls,
            resolver: Resolver::start(pool.clone()),
            writer: Writer::start(pool.clone(), settings.batching()),
            db_gate: DbGate::default(),
            key_failures,
            max_attempts: settings.worker_max_attempts,
            sync_lookback: Duration::from_secs(u64::from(settings.sync_lookback_days) * 86_400),
            callback_url: settings.callback_url().cloned(),
            broker,
            replay_days: settings.inbox.inbox_replay_days,
            pool,
        })
    }
}
