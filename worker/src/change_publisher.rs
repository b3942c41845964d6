//! The push side of the change feed: every committed change is published to `calsync.changes`
//! (routing key = kind, `message_id` = `change_id`, header `user_id`, persistent, confirmed), in
//! position order, by one worker at a time ([`crate::leader`]).
//!
//! At least once, never a gap: the publisher reads the changes after `change_feed.published_through`,
//! publishes them in order on one channel, waits for every confirm, and only then moves the mark.
//! A crash or a broker outage between the publish and the mark means the batch is published again
//! by whoever leads next (same `change_id`s), never that a change is passed over. The mark is read
//! and moved on the leader's own lock connection: a leader whose session died can no longer move it.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use calsync_common::db::changes;
use calsync_common::queue::{Broker, PublishError, message};

use crate::leader;

/// Changes published per confirm round.
pub const BATCH: i64 = 500;
/// How often an idle publisher looks for new changes (the push side's added latency).
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How long a publisher waits after a failed round (broker or database away).
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How often a worker that is not the publisher tries to become it.
const TAKEOVER_INTERVAL: Duration = Duration::from_secs(5);

pub struct ChangePublisher {
    pub database_url: String,
    pub pool: PgPool,
    pub broker: Broker,
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] PublishError),
}

pub async fn run(publisher: ChangePublisher, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Some(lock) = leader::try_lead(&publisher.database_url, changes::PUBLISHER_LOCK).await {
            tracing::info!("this worker publishes the change feed");
            publish_while_leading(&publisher, lock, &shutdown).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TAKEOVER_INTERVAL) => {}
        }
    }
}

async fn publish_while_leading(publisher: &ChangePublisher, mut lock: PgConnection, shutdown: &CancellationToken) {
    loop {
        let pause = match round(publisher, &mut lock).await {
            Ok(0) => IDLE_POLL,
            Ok(_) => Duration::ZERO,
            // Not connected yet, or between nodes: the backlog gauge shows a long outage.
            Err(RoundError::Broker(PublishError::Unavailable)) => RETRY_PAUSE,
            Err(error) => {
                tracing::warn!(%error, "could not publish changes; trying again");
                if matches!(error, RoundError::Database(_)) && !leader::still_leading(&mut lock).await {
                    tracing::warn!("lost the change publisher lock's connection; stepping down");
                    return;
                }
                RETRY_PAUSE
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Numbers what has committed, then publishes the next batch after the mark; returns how many.
async fn round(publisher: &ChangePublisher, lock: &mut PgConnection) -> Result<usize, RoundError> {
    changes::sequence_all(&publisher.pool).await?;
    let from = changes::published_through(lock).await?;
    let batch = changes::after(lock, from, BATCH).await?;
    let Some(last) = batch.last() else { return Ok(0) };
    let messages: Vec<_> = batch.iter().map(message::change).collect();
    publisher.broker.publish_in_order(&publisher.broker.topology().changes_exchange(), &messages).await?;
    changes::mark_published(lock, last.cursor).await?;
    metrics::counter!("calsync_changes_published_total").increment(batch.len() as u64);
    Ok(batch.len())
}
