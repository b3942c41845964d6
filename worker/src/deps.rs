//! What processing needs, built once per process and shared by every in-flight delivery.

use std::time::Duration;

use sqlx::PgPool;

use calsync_common::calendly::CalendlyClient;
use calsync_common::crypto::TokenCipher;

pub struct Deps {
    pub pool: PgPool,
    pub calendly: CalendlyClient,
    pub cipher: TokenCipher,
    /// Failed attempts after which a message is dead-lettered.
    pub max_attempts: u32,
    /// Backfill window start, counted back from now.
    pub sync_lookback: Duration,
    /// Shares one Calendly fetch among concurrent deliveries about the same event.
    pub event_fetches: crate::fetch::SingleFlight,
}
