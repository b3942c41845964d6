//! Replaying parked deliveries when a Calendly account is (re)connected.
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
    for (message_id, body) in &parked {
        broker.publish(&message::webhook(body.clone(), OffsetDateTime::now_utc())).await?;
        tracing::info!(%message_id, "replayed a parked delivery");
    }
    metrics::counter!("calsync_inbox_replayed_total").increment(parked.len() as u64);
    Ok(parked.len())
}

/// Moves every message in `calsync.dead` back to its work queue with a fresh attempt count, after
/// the cause has been fixed. A webhook's `dead` inbox row is cleared first so the worker does not
/// take the replay for a duplicate. Each message is republished (confirmed) before it is acked, so
/// a crash mid-way duplicates rather than loses. Returns how many were moved.
pub async fn replay_dead(pool: &sqlx::PgPool, broker: &Broker) -> Result<usize, ReplayDeadError> {
    use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    use crate::queue::message::{ATTEMPTS_HEADER, DEATH_REASON_HEADER, LAST_ERROR_HEADER, Outgoing};

    let channel = broker.open_channel().await?;
    let dead = broker.topology().dead_queue();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    // Only what is there now: a message that dies again while we work waits for the next run.
    let waiting = channel
        .queue_declare(dead.as_str().into(), passive, FieldTable::default())
        .await
        .map_err(PublishError::Channel)?
        .message_count();
    let mut moved = 0;
    for _ in 0..waiting {
        let Some(message) = channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(PublishError::Channel)?
        else {
            break;
        };
        let delivery = &message.delivery;
        let is_sync =
            delivery.routing_key.as_str().ends_with(".sync") || delivery.routing_key.as_str().starts_with("sync.");
        let routing_key =
            if is_sync { "sync.calendly.backfill".to_owned() } else { message::webhook_routing_key(&delivery.data) };
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let kept: std::collections::BTreeMap<_, _> = headers
            .inner()
            .iter()
            .filter(|(k, _)| {
                ![
                    ATTEMPTS_HEADER,
                    DEATH_REASON_HEADER,
                    LAST_ERROR_HEADER,
                    "x-death",
                    "x-first-death-exchange",
                    "x-first-death-queue",
                    "x-first-death-reason",
                    "x-delivery-count",
                ]
                .contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        headers = FieldTable::from(kept);
        if !is_sync {
            sqlx::query("DELETE FROM webhook_inbox WHERE message_id = $1 AND status = 'dead'")
                .bind(message::message_id(&delivery.data))
                .execute(pool)
                .await?;
        }
        let copy = Outgoing {
            routing_key,
            body: delivery.data.clone(),
            properties: delivery.properties.clone().with_headers(headers),
        };
        broker.publish(&copy).await?;
        delivery.acker.ack(BasicAckOptions::default()).await.map_err(PublishError::Channel)?;
        moved += 1;
    }
    let _ = channel.close(200, "replayed".into()).await;
    Ok(moved)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayDeadError {
    #[error("clearing the inbox row: {0}")]
    Database(#[from] sqlx::Error),
    #[error("moving a dead letter: {0}")]
    Broker(#[from] PublishError),
}
