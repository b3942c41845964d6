//! The AMQP side, and only that: consume with manual acks and a bounded prefetch, hand each
//! delivery to the processing code, settle it by the outcome. Retries and dead letters are
//! published (with confirms) before the original is acked, so a crash in between duplicates a
//! message rather than losing it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use calsync_common::calendly::webhook::Webhook;
use calsync_common::queue::message::{self, Incoming};
use calsync_common::queue::{Broker, RetryTarget};
use calsync_common::{retry, traces};

use crate::db_gate::DbGate;
use crate::deps::Deps;
use crate::error::ProcessError;
use crate::outcome::{self, Outcome};
use crate::{process, sync};

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

/// Why a consumer stopped without an error.
enum Stopped {
    Shutdown,
    /// PostgreSQL became unreachable: consume again once it is back.
    DatabaseDown,
}

/// Consumes `config.target`'s queue until `shutdown`, reconnecting whenever the broker link drops
/// and pausing while the database is unreachable.
pub async fn run(deps: Arc<Deps>, broker: Broker, config: ConsumerConfig, shutdown: CancellationToken) {
    let queue = broker.topology().queue_of(config.target);
    let mut generation = broker.subscribe();
    let mut database = deps.db_gate.subscribe();
    while !shutdown.is_cancelled() {
        let database_up = *database.borrow_and_update();
        if !database_up {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = until(&mut database, true) => continue,
            }
        }
        if !broker.is_ready() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = generation.changed() => continue,
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        }
        match consume(&deps, &broker, &queue, &config, &shutdown).await {
            Ok(Stopped::Shutdown) => break,
            Ok(Stopped::DatabaseDown) => tracing::warn!(%queue, "consumer paused while PostgreSQL is unreachable"),
            Err(error) => {
                tracing::warn!(%queue, %error, "consumer stopped; resubscribing when the broker is back");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Resolves once the database gate is `up` (never, if the gate is gone).
async fn until(gate: &mut tokio::sync::watch::Receiver<bool>, up: bool) {
    if gate.wait_for(|now| *now == up).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Returns `Ok` after a clean shutdown or a pause for the database, `Err` when the channel or
/// connection failed.
async fn consume(
    deps: &Arc<Deps>,
    broker: &Broker,
    queue: &str,
    config: &ConsumerConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Stopped> {
    let mut database = deps.db_gate.subscribe();
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
                break Ok(Stopped::Shutdown);
            }
            // Cancel the consumer (the connection stays): nothing more is delivered to us until the
            // database is back, so requeued deliveries do not loop through this worker meanwhile.
            _ = until(&mut database, false) => {
                let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                break Ok(Stopped::DatabaseDown);
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let (deps, broker, target) = (deps.clone(), broker.clone(), config.target);
                    let incoming = Incoming::read(&delivery);
                    // Every log line about this delivery says which one it is, even for a body
                    // that parses as nothing.
                    let span = delivery_span(queue, &incoming);
                    traces::continue_from(&span, &delivery.properties);
                    let work = async move {
                        let message_id = incoming.message_id.clone();
                        traces::for_message(&message_id, handle(&deps, &broker, target, delivery, incoming)).await
                    };
                    tracker.spawn(work.instrument(span));
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

/// The span of one delivery: every log line about it says which one it is; with traces on it is
/// also the consumer span, child of ingest's publish (through the `traceparent` header, which
/// retry copies, dead letters and replays keep).
fn delivery_span(queue: &str, incoming: &Incoming) -> tracing::Span {
    if !traces::enabled() {
        return tracing::info_span!("delivery", %queue, message_id = %incoming.message_id, attempt = incoming.attempt);
    }
    tracing::info_span!(
        "delivery",
        otel.name = "process",
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        "messaging.operation.type" = "process",
        messaging.destination.name = %queue,
        messaging.message.id = %incoming.message_id,
        %queue,
        message_id = %incoming.message_id,
        attempt = incoming.attempt,
    )
}

async fn handle(deps: &Deps, broker: &Broker, target: RetryTarget, delivery: Delivery, incoming: Incoming) {
    let started = std::time::Instant::now();
    metrics::gauge!("calsync_worker_in_flight").increment(1.0);
    let work = async {
        match target {
            RetryTarget::Webhooks => process::process_webhook(deps, &incoming).await,
            RetryTarget::Sync => (sync::process_sync(deps, &incoming).await, "sync"),
        }
    };
    let (outcome, event) = match catch_panic(work, incoming.attempt, deps.max_attempts).await {
        Ok(settled) => settled,
        Err(outcome) => {
            let event = match target {
                RetryTarget::Webhooks => process::event_label(Webhook::parse(&incoming.body).ok().as_ref()),
                RetryTarget::Sync => "sync",
            };
            (outcome, event)
        }
    };
    tracing::debug!(outcome = outcome.label(), "delivery handled");
    metrics::counter!("calsync_worker_deliveries_total", "event" => event, "outcome" => outcome.label()).increment(1);
    metrics::histogram!("calsync_worker_processing_seconds").record(started.elapsed().as_secs_f64());
    settle(broker, &deps.db_gate, target, delivery, &incoming, outcome).await;
    metrics::gauge!("calsync_worker_in_flight").decrement(1.0);
}

/// A panic must not leave the message unacked with its prefetch slot taken until the channel
/// closes: it becomes a failed attempt like any other (retried, then dead with the panic's text).
async fn catch_panic<T>(work: impl Future<Output = T>, attempt: u32, max_attempts: u32) -> Result<T, Outcome> {
    AssertUnwindSafe(work).catch_unwind().await.map_err(|panic| {
        let reason = format!("processing panicked: {}", panic_message(panic.as_ref()));
        tracing::error!(%reason, "delivery processing panicked");
        metrics::counter!("calsync_worker_panics_total").increment(1);
        outcome::decide(ProcessError::transient(reason), attempt, max_attempts)
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Turns an outcome into AMQP: ack, or publish a retry / dead-letter copy (confirmed) and then ack.
async fn settle(
    broker: &Broker,
    db_gate: &DbGate,
    target: RetryTarget,
    delivery: Delivery,
    incoming: &Incoming,
    outcome: Outcome,
) {
    let forward = match outcome {
        Outcome::Ack { .. } => None,
        Outcome::Retry { reason, at_least } => {
            let tier = retry::redelivery_tier(incoming.attempt, at_least);
            tracing::info!(delay = ?retry::REDELIVERY_DELAYS[tier], %reason, "retrying later");
            Some(incoming.retry(target, tier, &reason))
        }
        Outcome::Defer { reason, at_least } => {
            let tier = retry::deferral_tier(at_least);
            tracing::debug!(delay = ?retry::REDELIVERY_DELAYS[tier], %reason, "put off");
            Some(incoming.deferred(target, tier, &reason))
        }
        Outcome::Continue { job, at_least } => {
            let tier = retry::deferral_tier(at_least);
            tracing::info!(delay = ?retry::REDELIVERY_DELAYS[tier], "sync pass continues later from the page it reached");
            Some(message::sync_continuation(&job, tier))
        }
        Outcome::Dead { reason } => {
            tracing::warn!(%reason, "dead-lettering");
            Some(incoming.dead_letter(target, &reason))
        }
        Outcome::Requeue { reason } => {
            // Back to the queue as it is (no attempt counted); our consumer pauses meanwhile. nack,
            // not reject: on RabbitMQ 4.x it does not count toward x-delivery-limit, so even a long
            // outage cannot push a healthy webhook into calsync.dead (see topology.rs).
            tracing::info!(%reason, "database unreachable; requeueing");
            db_gate.report_down();
            let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            return;
        }
    };
    if let Some(copy) = forward
        && let Err(error) = broker.publish(&copy).await
    {
        tracing::warn!(%error, "could not publish the retry/dead-letter copy; requeueing the original");
        tokio::time::sleep(REQUEUE_PAUSE).await;
        // reject, not nack: it counts toward x-delivery-limit on RabbitMQ 3.x and 4.x alike, so a
        // broker that keeps refusing the copy cannot make this loop forever (see topology.rs).
        let _ = delivery.reject(BasicRejectOptions { requeue: true }).await;
        return;
    }
    if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
        // The broker will redeliver it; processing is idempotent, so that is only extra work.
        tracing::warn!(%error, "ack failed; the message will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_delivery_is_retried_with_the_panic_message_then_dead_on_the_last_attempt() {
        let panics = || async { panic!("expires_in overflowed") };

        let first: Result<(), Outcome> = catch_panic(panics(), 1, 3).await;
        let last: Result<(), Outcome> = catch_panic(panics(), 3, 3).await;

        assert_eq!(
            first,
            Err(Outcome::Retry { reason: "processing panicked: expires_in overflowed".into(), at_least: None })
        );
        assert_eq!(
            last,
            Err(Outcome::Dead {
                reason: "gave up after 3 attempts: processing panicked: expires_in overflowed".into()
            })
        );
        assert_eq!(catch_panic(async { 7 }, 1, 3).await, Ok(7));
    }
}
