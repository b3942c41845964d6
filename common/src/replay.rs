//! Replaying parked deliveries addressed to a Calendly account that is (again) connected: on
//! connect (ingest, in the background after the confirm) and at every periodic subscription check of
//! an active connection (the worker), which picks up what a connect could not finish and the
//! deliveries of a row a late-stored token refresh brought back to `active`.
//!
//! `unmatched` and `awaiting_reauth` inbox rows keep their body. Once a user has proved control of
//! the Calendly account they were addressed to (by completing OAuth), those bodies are published
//! again, unchanged: the worker then resolves them through `created_by` like any live delivery, so
//! they land with the connecting user and nowhere else. The inbox row flips to `processed` when the
//! worker commits; replaying twice is harmless (the second copy is a duplicate).

use time::OffsetDateTime;

use crate::db::inbox;
use crate::queue::{Broker, PublishError, message};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading parked deliveries: {0}")]
    Database(#[from] sqlx::Error),
    #[error("republishing a parked delivery: {0}")]
    Publish(#[from] PublishError),
}

/// Republishes every replayable delivery addressed to `calendly_user_uri`; returns how many.
pub async fn replay_parked(
    pool: &sqlx::PgPool,
    broker: &Broker,
    calendly_user_uri: &str,
    replay_days: u32,
) -> Result<usize, ReplayError> {
    let parked = inbox::parked_for(pool, calendly_user_uri, replay_days).await?;
    for (message_id, body, traceparent) in &parked {
        let replayed = message::webhook(body.clone(), OffsetDateTime::now_utc());
        broker.publish(&replayed.continuing(traceparent.as_deref())).await?;
        tracing::info!(%message_id, "replayed a parked delivery");
    }
    metrics::counter!("calsync_inbox_replayed_total").increment(parked.len() as u64);
    Ok(parked.len())
}
