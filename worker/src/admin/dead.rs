//! `calsync-worker dead`: what is in `calsync.dead`, without touching a single dead letter.
//!
//! Taking a message out and giving it back counts as a delivery on RabbitMQ's quorum queues
//! (every return on 4.0–4.2, whose default delivery limit is 20, and any return under a policy
//! with a limit): a listing that did so would, run often enough, drop dead letters — the only
//! copy of a webhook. So the listing comes from PostgreSQL, where the worker records every webhook
//! it dead-letters (`webhook_inbox`, status `dead`), and the queue is only counted (a passive
//! declare reads the depth and delivers nothing).

use std::fmt;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;
use time::OffsetDateTime;

use calsync_common::db::inbox::InboxStatus;
use calsync_common::queue::{Broker, PublishError};

/// One dead webhook as `dead` prints it: never its body.
#[derive(sqlx::FromRow)]
pub struct DeadLine {
    pub received_at: OffsetDateTime,
    pub event: Option<String>,
    pub attempts: i32,
    pub reason: Option<String>,
}

impl fmt::Display for DeadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let age = (OffsetDateTime::now_utc() - self.received_at).whole_seconds().max(0);
        write!(
            f,
            "age={}h{:02}m  {}  attempts={}  {}",
            age / 3600,
            age % 3600 / 60,
            self.event.as_deref().unwrap_or("?"),
            self.attempts,
            self.reason.as_deref().unwrap_or("-")
        )
    }
}

/// The dead-letter queue as the operator sees it.
pub struct DeadReport {
    /// Dead webhooks, oldest first.
    pub webhooks: Vec<DeadLine>,
    /// Messages in `calsync.dead` now (webhooks, sync jobs, and letters the broker dead-lettered
    /// itself after too many redeliveries, which no worker saw fail).
    pub in_queue: u32,
}

pub async fn dead(pool: &PgPool, broker: &Broker) -> Result<DeadReport, anyhow::Error> {
    let webhooks = sqlx::query_as(
        "SELECT received_at, event, attempts, last_error AS reason FROM webhook_inbox WHERE status = $1 \
         ORDER BY received_at",
    )
    .bind(InboxStatus::Dead)
    .fetch_all(pool)
    .await?;
    let channel = broker.open_channel().await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let in_queue = channel
        .queue_declare(broker.topology().dead_queue().as_str().into(), passive, FieldTable::default())
        .await
        .map_err(PublishError::Channel)?
        .message_count();
    let _ = channel.close(200, "counted".into()).await;
    Ok(DeadReport { webhooks, in_queue })
}
