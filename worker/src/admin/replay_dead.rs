//! `calsync-worker replay-dead`: dead letters back to their work queues once the cause is fixed.

use calsync_common::queue::{Broker, RetryTarget, message};

/// Moves every message in `calsync.dead` back to its work queue with a fresh attempt count, after
/// the cause has been fixed. A webhook's `dead` inbox row is cleared first so the worker does not
/// take the replay for a duplicate. Each message is republished (confirmed) before it is acked, so
/// a crash mid-way duplicates rather than loses. Returns how many were moved.
pub async fn replay_dead(pool: &sqlx::PgPool, broker: &Broker) -> anyhow::Result<usize> {
    use anyhow::Context;
    use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    let channel = broker.open_channel().await.context("opening a channel")?;
    let dead = broker.topology().dead_queue();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    // Only what is there now: a message that dies again while we work waits for the next run.
    let waiting = channel
        .queue_declare(dead.as_str().into(), passive, FieldTable::default())
        .await
        .context("looking at the dead-letter queue")?
        .message_count();
    let mut moved = 0;
    for _ in 0..waiting {
        let Some(message) = channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .context("taking a dead letter")?
        else {
            break;
        };
        let delivery = &message.delivery;
        let (target, copy) = message::revived(delivery);
        if target == RetryTarget::Webhooks {
            // The delivery's identity travels in its properties: a body `forget` rewrote keeps the
            // id of the webhook it was (its hash no longer matches).
            let message_id = message::Incoming::read(delivery).message_id;
            calsync_common::db::inbox::forget_dead(pool, &message_id).await.context("clearing the inbox row")?;
        }
        broker.publish(&copy).await.context("republishing a dead letter")?;
        delivery.acker.ack(BasicAckOptions::default()).await.context("acking a moved dead letter")?;
        moved += 1;
    }
    let _ = channel.close(200, "replayed".into()).await;
    Ok(moved)
}
