//! The AMQP side, and only that: consume with manual acks and a bounded prefetch, hand each
//! delivery to the processing code, settle it by the outcome. Retries and dead letters are
//! published (with confirms) before the original is acked, so a crash in between duplicates a
//! message rather than losing it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use calsync_common::queue::message::{
    self, ATTEMPTS_HEADER, DEATH_REASON_HEADER, LAST_ERROR_HEADER, Outgoing, RECEIVED_AT_MS_HEADER, SyncJob,
};
use calsync_common::queue::{Broker, RetryTarget, Topology};
use calsync_common::retry;

use crate::deps::Deps;
use crate::process::{self, Outcome, WebhookDelivery};
use crate::sync;

/// How long to wait before requeueing a message whose retry could not be published (the broker is
/// struggling; an immediate requeue would spin).
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct ConsumerConfig {
    pub target: RetryTarget,
    /// Deliveries in flight at once; also the prefetch.
    pub concurrency: u16,
    /// After shutdown, how long in-flight deliveries may take before their channel is closed (which
    /// requeues them).
    pub grace: Duration,
}

/// Consumes `config.target`'s queue until `shutdown`, reconnecting whenever the broker link drops.
pub async fn run(deps: Arc<Deps>, broker: Broker, config: ConsumerConfig, shutdown: CancellationToken) {
    let queue = broker.topology().queue_of(config.target);
    let mut generation = broker.subscribe();
    while !shutdown.is_cancelled() {
        if !broker.is_ready() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = generation.changed() => continue,
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        }
        match consume(&deps, &broker, &queue, &config, &shutdown).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%queue, %error, "consumer stopped; resubscribing when the broker is back");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Returns `Ok` after a clean shutdown, `Err` when the channel or connection failed.
async fn consume(
    deps: &Arc<Deps>,
    broker: &Broker,
    queue: &str,
    config: &ConsumerConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let channel = broker.open_channel().await?;
    // Prefetch = concurrency: the broker never hands us more than we will work on at once, so a
    // crashed worker strands at most that many (they are redelivered to others).
    channel.basic_qos(config.concurrency, BasicQosOptions::default()).await?;
    let tag = format!("calsync-worker-{}", uuid::Uuid::new_v4());
    // no_ack = false: a message leaves the queue only when we ack it after the commit.
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions { no_ack: false, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    tracing::info!(%queue, prefetch = config.concurrency, "consuming");
    let tracker = TaskTracker::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                break Ok(());
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let (deps, broker, target) = (deps.clone(), broker.clone(), config.target);
                    tracker.spawn(async move { handle(&deps, &broker, target, delivery).await });
                }
                Some(Err(error)) => break Err(error.into()),
                None => break Err(anyhow::anyhow!("the consumer was cancelled by the broker")),
            }
        }
    };
    tracker.close();
    if tokio::time::timeout(config.grace, tracker.wait()).await.is_err() {
        tracing::warn!(%queue, "in-flight deliveries did not finish in time; closing the channel requeues them");
    }
    let _ = channel.close(200, "worker stopping".into()).await;
    result
}

fn attempt_of(delivery: &Delivery) -> u32 {
    let failed = message::int_header(&delivery.properties, ATTEMPTS_HEADER).unwrap_or(0).max(0) as u32;
    failed + 1
}

async fn handle(deps: &Deps, broker: &Broker, target: RetryTarget, delivery: Delivery) {
    let started = std::time::Instant::now();
    let attempt = attempt_of(&delivery);
    metrics::gauge!("calsync_worker_in_flight").increment(1.0);
    let (outcome, event) = match target {
        RetryTarget::Webhooks => {
            let webhook = WebhookDelivery {
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_owned())
                    .unwrap_or_else(|| message::message_id(&delivery.data)),
                body: delivery.data.clone(),
                attempt,
                received_at: received_at(&delivery),
            };
            process::process_webhook(deps, &webhook).await
        }
        RetryTarget::Sync => match serde_json::from_slice::<SyncJob>(&delivery.data) {
            Ok(job) => (sync::process_sync(deps, job.connection_id, attempt).await, "sync"),
            Err(error) => (Outcome::Dead { reason: format!("not a sync job: {error}") }, "sync"),
        },
    };
    let outcome_label = match &outcome {
        Outcome::Done(status) => status.as_str(),
        Outcome::Retry { .. } => "retry",
        Outcome::Dead { .. } => "dead",
    };
    tracing::debug!(attempt, outcome = outcome_label, "delivery handled");
    metrics::counter!("calsync_worker_deliveries_total", "event" => event, "outcome" => outcome_label).increment(1);
    metrics::histogram!("calsync_worker_processing_seconds").record(started.elapsed().as_secs_f64());
    settle(broker, target, delivery, attempt, outcome).await;
    metrics::gauge!("calsync_worker_in_flight").decrement(1.0);
}

fn received_at(delivery: &Delivery) -> OffsetDateTime {
    message::int_header(&delivery.properties, RECEIVED_AT_MS_HEADER)
        .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
        .or_else(|| delivery.properties.timestamp().and_then(|s| OffsetDateTime::from_unix_timestamp(s as i64).ok()))
        .unwrap_or_else(OffsetDateTime::now_utc)
}

async fn settle(broker: &Broker, target: RetryTarget, delivery: Delivery, attempt: u32, outcome: Outcome) {
    let forward = match outcome {
        Outcome::Done(_) => None,
        Outcome::Retry { reason, at_least } => {
            let tier = retry::redelivery_tier(attempt, at_least);
            tracing::info!(attempt, delay = ?retry::REDELIVERY_DELAYS[tier], %reason, "retrying later");
            Some(Outgoing {
                routing_key: Topology::retry_routing_key(target, tier),
                body: delivery.data.clone(),
                properties: message::with_headers(
                    &delivery.properties,
                    &[
                        (ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(attempt))),
                        (LAST_ERROR_HEADER, message::text(&truncate(&reason))),
                    ],
                ),
            })
        }
        Outcome::Dead { reason } => {
            tracing::warn!(attempt, %reason, "dead-lettering");
            Some(Outgoing {
                routing_key: Topology::dead_routing_key(target),
                body: delivery.data.clone(),
                properties: message::with_headers(
                    &delivery.properties,
                    &[
                        (ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(attempt))),
                        (DEATH_REASON_HEADER, message::text(&truncate(&reason))),
                        (LAST_ERROR_HEADER, message::text(&truncate(&reason))),
                    ],
                ),
            })
        }
    };
    if let Some(copy) = forward
        && let Err(error) = broker.publish(&copy).await
    {
        tracing::warn!(%error, "could not publish the retry/dead-letter copy; requeueing the original");
        tokio::time::sleep(REQUEUE_PAUSE).await;
        let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
        return;
    }
    if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
        // The broker will redeliver it; processing is idempotent, so that is only extra work.
        tracing::warn!(%error, "ack failed; the message will be redelivered");
    }
}

/// AMQP header values are bounded; keep reasons readable and small.
fn truncate(reason: &str) -> String {
    reason.chars().take(1000).collect()
}
