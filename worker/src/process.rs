//! From one queued webhook to rows, with no AMQP types: the consumer hands over the body and what
//! it knows about earlier attempts, and settles the message by the returned [`Outcome`].

use std::time::Duration;

use time::OffsetDateTime;

use calsync_common::calendly::types::EventKind;
use calsync_common::calendly::webhook::{Change, InviteeChange, Webhook};
use calsync_common::db::connections::{self, Connection, ConnectionStatus};
use calsync_common::db::inbox::{self, InboxRecord, InboxStatus};
use calsync_common::db::meetings;
use calsync_common::meeting::{Meeting, MeetingInvitee};

use crate::deps::Deps;
use crate::error::ProcessError;

/// A webhook as the consumer received it.
#[derive(Debug, Clone)]
pub struct WebhookDelivery {
    pub message_id: String,
    pub body: Vec<u8>,
    /// 1 for the first try; grows with every delayed redelivery.
    pub attempt: u32,
    /// Ingest's receive time (for the inbox and the end-to-end latency).
    pub received_at: OffsetDateTime,
}

/// What the consumer should do with the message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Finished (rows written, or parked/ignored with an inbox row): acknowledge.
    Done(InboxStatus),
    /// Not yet: redeliver after at least `at_least` (a delay tier is chosen from the attempt).
    Retry { reason: String, at_least: Option<Duration> },
    /// Never: dead-letter with the reason.
    Dead { reason: String },
}

/// Low-cardinality `event` label: a known event's name, `other`, or `unparseable`.
pub fn event_label(webhook: Option<&Webhook>) -> &'static str {
    match webhook {
        Some(webhook) => webhook.kind().map_or("other", EventKind::as_str),
        None => "unparseable",
    }
}

struct Context<'a> {
    deps: &'a Deps,
    delivery: &'a WebhookDelivery,
    webhook: Option<&'a Webhook>,
}

impl Context<'_> {
    fn record<'r>(&'r self, status: InboxStatus, last_error: Option<&'r str>) -> InboxRecord<'r> {
        InboxRecord {
            message_id: &self.delivery.message_id,
            event: self.webhook.map(|w| w.event.as_str()),
            created_by: self.webhook.map(|w| w.created_by.as_str()),
            received_at: self.delivery.received_at,
            status,
            attempts: self.delivery.attempt as i32,
            last_error,
            body: &self.delivery.body,
        }
    }

    async fn park(&self, status: InboxStatus, reason: Option<&str>) -> Outcome {
        match inbox::record(&self.deps.pool, &self.record(status, reason)).await {
            Ok(()) => Outcome::Done(status),
            Err(error) => self.retry_or_dead(format!("database: {error}"), None).await,
        }
    }

    /// A permanent failure: the inbox says `dead` (best effort; the dead letter itself carries the
    /// reason even when the database is what failed).
    async fn dead(&self, reason: String) -> Outcome {
        if let Err(error) = inbox::record(&self.deps.pool, &self.record(InboxStatus::Dead, Some(&reason))).await {
            tracing::warn!(message_id = %self.delivery.message_id, %error, "could not record a dead delivery in the inbox");
        }
        Outcome::Dead { reason }
    }

    async fn retry_or_dead(&self, reason: String, at_least: Option<Duration>) -> Outcome {
        if self.delivery.attempt >= self.deps.max_attempts {
            return self.dead(format!("gave up after {} attempts: {reason}", self.delivery.attempt)).await;
        }
        Outcome::Retry { reason, at_least }
    }
}

/// Processes one webhook delivery; also returns its `event` metric label.
pub async fn process_webhook(deps: &Deps, delivery: &WebhookDelivery) -> (Outcome, &'static str) {
    let webhook = match Webhook::parse(&delivery.body) {
        Ok(webhook) => webhook,
        Err(error) => {
            let ctx = Context { deps, delivery, webhook: None };
            return (ctx.dead(error.to_string()).await, event_label(None));
        }
    };
    let ctx = Context { deps, delivery, webhook: Some(&webhook) };
    (process_parsed(&ctx, &webhook).await, event_label(Some(&webhook)))
}

async fn process_parsed(ctx: &Context<'_>, webhook: &Webhook) -> Outcome {
    let (deps, delivery) = (ctx.deps, ctx.delivery);

    if let Change::Ignored = webhook.change {
        return ctx.park(InboxStatus::Ignored, None).await;
    }

    // The one and only way to find the user: the Calendly user who created the subscription.
    let connection = match connections::resolve_for_delivery(&deps.pool, &webhook.created_by, &delivery.message_id)
        .await
    {
        // Duplicates (Calendly retries, our own redeliveries) of finished work change nothing.
        Ok(Some(resolved)) if resolved.inbox_status.is_some_and(InboxStatus::is_final) => {
            return Outcome::Done(InboxStatus::Processed);
        }
        Ok(Some(resolved)) => resolved.connection,
        Ok(None) => {
            tracing::info!(message_id = %delivery.message_id, created_by = %webhook.created_by, "no connected user for this webhook; parked as unmatched");
            metrics::counter!("calsync_worker_unmatched_total").increment(1);
            // The inbox guard keeps an already processed duplicate processed.
            return ctx.park(InboxStatus::Unmatched, None).await;
        }
        Err(error) => return ctx.retry_or_dead(format!("database: {error}"), None).await,
    };
    if connection.status == ConnectionStatus::NeedsReauth {
        return ctx.park(InboxStatus::AwaitingReauth, connection.last_error.as_deref()).await;
    }

    let change = match &webhook.change {
        Change::Invitee(change) => change,
        Change::Malformed { reason } => return ctx.dead(reason.clone()).await,
        Change::Ignored => unreachable!("ignored webhooks returned above"),
    };
    match apply(ctx, &connection, change).await {
        Ok(()) => {
            let latency = (OffsetDateTime::now_utc() - delivery.received_at).as_seconds_f64().max(0.0);
            metrics::histogram!("calsync_webhook_end_to_end_seconds").record(latency);
            Outcome::Done(InboxStatus::Processed)
        }
        Err(ProcessError::NeedsReauth(reason)) => ctx.park(InboxStatus::AwaitingReauth, Some(&reason)).await,
        Err(ProcessError::Transient { reason, at_least }) => ctx.retry_or_dead(reason, at_least).await,
        Err(ProcessError::Permanent(reason)) => ctx.dead(reason).await,
    }
}

/// Fetches the event with the connection's own token and writes meeting, invitee and inbox row in
/// one transaction.
async fn apply(ctx: &Context<'_>, connection: &Connection, change: &InviteeChange) -> Result<(), ProcessError> {
    let (deps, invitee) = (ctx.deps, &change.invitee);
    let event = deps.event_fetches.get_event(deps, connection, &invitee.event, change.event_updated_at).await?;
    if event.uri != invitee.event {
        return Err(ProcessError::Permanent(format!("Calendly answered {} for {}", event.uri, invitee.event)));
    }
    let mut tx = deps.pool.begin().await?;
    if !connections::lock_if_linked(&mut tx, connection).await? {
        return Err(ProcessError::transient("the connection changed while processing; resolving again"));
    }
    let meeting_id = meetings::upsert_meeting(&mut tx, connection.user_id, &Meeting::from_event(&event)).await?;
    meetings::upsert_invitee(&mut tx, meeting_id, &MeetingInvitee::from_invitee(invitee)).await?;
    inbox::record(&mut *tx, &ctx.record(InboxStatus::Processed, None)).await?;
    tx.commit().await?;
    tracing::debug!(message_id = %ctx.delivery.message_id, kind = ?change.kind, user_id = %connection.user_id, "webhook applied");
    Ok(())
}
