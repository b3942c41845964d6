//! Exchange, queues and bindings. Whoever starts first declares them; every declaration is
//! idempotent (same arguments every time), so ingest and any number of workers can race.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::retry::REDELIVERY_DELAYS;

/// A message redelivered more often than this (worker crashes mid-processing, for example) is
/// dead-lettered by the broker itself instead of looping forever. Far above `WORKER_MAX_ATTEMPTS`,
/// which handles every failure the worker sees; this catches the ones it never gets to see.
///
/// RabbitMQ 3.10–3.13 and 4.x differ here, and calsync is safe on both:
/// - 4.x counts `basic.reject` (and returns from closed channels) toward the limit but not
///   `basic.nack`, and **drops** an over-limit message when the queue has no dead-letter target.
///   Our work queues always carry `x-dead-letter-exchange` (to `calsync.dead`), so an over-limit
///   message is dead-lettered, never dropped, on every version.
/// - A delivery the worker gives back because *it* failed (its retry copy could not be published)
///   is `reject`ed, which counts on 3.x and 4.x alike, so such a loop ends in `calsync.dead`.
/// - The one give-back that must not count, a database outage, is `nack`ed: it happens at most once
///   per in-flight delivery per outage, because the consumer is cancelled until the database is back.
pub const BROKER_DELIVERY_LIMIT: i64 = 50;

/// `x-delivery-limit` of `calsync.dead`: none (see [`Topology::declare`]).
pub const UNLIMITED_DELIVERIES: i64 = -1;

/// RabbitMQ refused a declaration because the entity exists with other arguments.
fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406)
}

/// Queues that have delayed-retry companions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryTarget {
    Webhooks,
    Sync,
}

impl RetryTarget {
    fn short(self) -> &'static str {
        match self {
            Self::Webhooks => "webhooks",
            Self::Sync => "sync",
        }
    }
}

/// Names of everything calsync declares. The prefix is empty in production (names exactly as in
/// ARCHITECTURE.md); tests give each topology its own prefix so they never share a queue.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    fn name(&self, base: &str) -> String {
        if self.prefix.is_empty() { base.to_owned() } else { format!("{}.{base}", self.prefix) }
    }

    pub fn exchange(&self) -> String {
        self.name("calsync")
    }
    /// Committed changes for the app (routing key = kind); calsync binds no queue to it.
    pub fn changes_exchange(&self) -> String {
        self.name("calsync.changes")
    }
    pub fn webhooks_queue(&self) -> String {
        self.name("calsync.webhooks")
    }
    pub fn sync_queue(&self) -> String {
        self.name("calsync.sync")
    }
    pub fn dead_queue(&self) -> String {
        self.name("calsync.dead")
    }
    pub fn queue_of(&self, target: RetryTarget) -> String {
        match target {
            RetryTarget::Webhooks => self.webhooks_queue(),
            RetryTarget::Sync => self.sync_queue(),
        }
    }

    /// `calsync.webhooks.retry.5s`: holds messages for one fixed delay, then hands them back.
    pub fn retry_queue(&self, target: RetryTarget, tier: usize) -> String {
        self.name(&format!("calsync.{}.retry.{}s", target.short(), REDELIVERY_DELAYS[tier].as_secs()))
    }

    /// Routing key (on the main exchange) of a retry tier.
    pub fn retry_routing_key(target: RetryTarget, tier: usize) -> String {
        format!("retry.{}.{}s", target.short(), REDELIVERY_DELAYS[tier].as_secs())
    }

    /// Routing key of a dead letter from `target`.
    pub fn dead_routing_key(target: RetryTarget) -> String {
        format!("dead.{}", target.short())
    }

    /// The work queue a dead letter came from, from its routing key (`dead.sync` for sync jobs,
    /// whether we dead-lettered it or the broker did; webhooks otherwise).
    pub fn target_of_dead_letter(routing_key: &str) -> RetryTarget {
        if routing_key == Self::dead_routing_key(RetryTarget::Sync) || routing_key.starts_with("sync.") {
            RetryTarget::Sync
        } else {
            RetryTarget::Webhooks
        }
    }

    /// Every queue this topology declares.
    pub fn queues(&self) -> Vec<String> {
        let mut queues = vec![self.webhooks_queue(), self.sync_queue(), self.dead_queue()];
        for target in [RetryTarget::Webhooks, RetryTarget::Sync] {
            queues.extend((0..REDELIVERY_DELAYS.len()).map(|tier| self.retry_queue(target, tier)));
        }
        queues
    }

    /// Deletes every queue (with its messages) and the exchange. For tests and the demo, which own
    /// prefixed topologies; never called on the production names by calsync itself.
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        for queue in self.queues() {
            channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        channel.exchange_delete(self.changes_exchange().as_str().into(), ExchangeDeleteOptions::default()).await?;
        channel.exchange_delete(self.exchange().as_str().into(), ExchangeDeleteOptions::default()).await
    }

    /// Declares the whole topology on `conn` (on channels of its own).
    pub async fn declare(&self, conn: &Connection) -> lapin::Result<()> {
        let channel = conn.create_channel().await?;
        let exchange = self.exchange();
        // Durable: the exchange and its bindings survive a broker restart.
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel.exchange_declare(exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        let changes = self.changes_exchange();
        channel.exchange_declare(changes.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;

        // calsync.dead holds the only copy of what could never be processed, and has nowhere to
        // send a message past a delivery limit: RabbitMQ 4.0–4.2 give every quorum queue a limit of
        // 20, and any return (a consumer closing its channel, a nack) counts. So it is declared
        // without a limit (-1; 3.10 and 4.x accept it). A queue declared by an earlier calsync
        // has no such argument, and RabbitMQ refuses to redeclare a queue with different arguments
        // (PRECONDITION_FAILED, which closes the channel): it is then declared as it is, and a
        // policy gives it the same (README, "Dead letters"). calsync's own commands never hand a
        // dead letter back either way.
        let mut unlimited = quorum();
        unlimited.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(UNLIMITED_DELIVERIES));
        let channel = match self.declare_queue(&channel, &self.dead_queue(), unlimited).await {
            Ok(()) => channel,
            Err(error) if is_precondition_failed(&error) => {
                tracing::warn!(
                    queue = %self.dead_queue(),
                    "the dead-letter queue predates its unlimited delivery count; keeping it as it is (see README: a policy)"
                );
                let channel = conn.create_channel().await?;
                self.declare_queue(&channel, &self.dead_queue(), quorum()).await?;
                channel
            }
            Err(error) => return Err(error),
        };
        self.bind(&channel, &self.dead_queue(), "dead.#").await?;

        for (target, pattern) in [(RetryTarget::Webhooks, "webhook.#"), (RetryTarget::Sync, "sync.#")] {
            let queue = self.queue_of(target);
            let mut args = quorum();
            // A message the consumer keeps failing to settle (crash loops) goes to calsync.dead
            // rather than being redelivered forever.
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(BROKER_DELIVERY_LIMIT));
            dead_letter_to(&mut args, &exchange, &Self::dead_routing_key(target));
            self.declare_queue(&channel, &queue, args).await?;
            self.bind(&channel, &queue, pattern).await?;

            for (tier, delay) in REDELIVERY_DELAYS.iter().enumerate() {
                let retry = self.retry_queue(target, tier);
                let mut args = quorum();
                // One TTL per queue: every message in it expires in arrival order, so a short
                // delay never waits behind a long one.
                args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay.as_millis() as i64));
                // Expired messages go straight back to the work queue through the default exchange.
                dead_letter_to(&mut args, "", &queue);
                self.declare_queue(&channel, &retry, args).await?;
                self.bind(&channel, &retry, &Self::retry_routing_key(target, tier)).await?;
            }
        }
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    async fn declare_queue(&self, channel: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
        // Durable: queued webhooks survive a broker restart (quorum queues are always durable).
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(name.into(), options, args).await.map(|_| ())
    }

    async fn bind(&self, channel: &Channel, queue: &str, pattern: &str) -> lapin::Result<()> {
        channel
            .queue_bind(
                queue.into(),
                self.exchange().as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    // Quorum queues replicate and fsync before confirming, so a confirm means the broker really holds it.
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    args
}

fn dead_letter_to(args: &mut FieldTable, exchange: &str, routing_key: &str) {
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(exchange)));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(LongString::from(routing_key)));
    // at-least-once: the broker only drops the source copy once the dead-letter target confirmed it,
    // so dead-lettering itself cannot lose a message (requires reject-publish overflow).
    args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString(LongString::from("at-least-once")));
    args.insert("x-overflow".into(), AMQPValue::LongString(LongString::from("reject-publish")));
}
