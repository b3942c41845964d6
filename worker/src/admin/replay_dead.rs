//! `calsync-worker replay-dead`: dead letters back to their work queues once the cause is fixed.

use calsync_common::queue::{Broker, PublishError, RetryTarget, message};

/// Moves every message in `calsync.dead` back to its work queue with a fresh attempt count, after
/// the cause has been fixed. A webhook's `dead` inbox row is cleared first so the worker does not
/// take the replay for a duplicate. Each message is republished (confirmed) before it is acked, so
/// a crash mid-way duplicates rather than loses. Returns how many were moved.
pub async fn replay_dead(pool: &sqlx::PgPool, broker: &Broker) -> Result<usize, ReplayDeadError> {
    use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

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
        let (target, copy) = message::revived(delivery);
        if target == RetryTarget::Webhooks {
            calsync_common::db::inbox::forget_dead(pool, &message::message_id(&delivery.data)).await?;
        }
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
