//! From one queued webhook to rows, with no AMQP types: the consumer hands over the delivery it
//! read, and settles the message by the returned [`Outcome`].

use time::OffsetDateTime;

use calsync_common::calendly::types::EventKind;
use calsync_common::calendly::webhook::{Change, InviteeChange, Webhook};
use calsync_common::db::connections::{Connection, ConnectionStatus};
use calsync_common::db::inbox::{self, InboxRecord, InboxStatus};
use calsync_common::meeting::{Meeting, MeetingInvitee};
use calsync_common::queue::message::{self, Incoming};

use crate::deps::Deps;
use crate::error::ProcessError;
use crate::outcome::{self, Outcome};
use crate::writer::{Applied, ProcessedDelivery, Write};

/// Low-cardinality `event` label: a known event's name, `other`, or `unparseable`.
pub fn event_label(webhook: Option<&Webhook>) -> &'static str {
    match webhook {
        Some(webhook) => webhook.kind().map_or("other", EventKind::as_str),
        None => "unparseable",
    }
}

/// Processes one webhook delivery; also returns its `event` metric label.
pub async fn process_webhook(deps: &Deps, delivery: &Incoming) -> (Outcome, &'static str) {
    // Until this delivery has handed its rows to the writer (or found it has none), a batch
    // being gathered may wait for it.
    let _may_write = deps.writer.expect();
    let webhook = Webhook::parse(&delivery.body);
    let label = event_label(webhook.as_ref().ok());
    let outcome = match &webhook {
        Ok(webhook) => match handle(deps, delivery, webhook).await {
            Ok(outcome) => outcome,
            Err(error) => outcome::decide(error, delivery.attempt, deps.max_attempts),
        },
        Err(error) => Outcome::Dead { reason: error.to_string() },
    };
    (record(deps, delivery, webhook.as_ref().ok(), outcome).await, label)
}

/// The webhook's work. Errors are sorted into an outcome by [`outcome::decide`]; the inbox is
/// written by [`record`], except `processed`, which commits with the rows.
async fn handle(deps: &Deps, delivery: &Incoming, webhook: &Webhook) -> Result<Outcome, ProcessError> {
    let change = match &webhook.change {
        Change::Ignored => return Ok(Outcome::ack(InboxStatus::Ignored)),
        Change::Invitee(change) => Ok(change),
        Change::Malformed { reason } => Err(reason),
    };

    // The one and only way to find the user: the Calendly user who created the subscription.
    let Some(resolved) = deps.resolver.resolve(&webhook.created_by, &delivery.message_id).await? else {
        tracing::info!(created_by = %webhook.created_by, "no connected user for this webhook; parked as unmatched");
        metrics::counter!("calsync_worker_unmatched_total").increment(1);
        return Ok(Outcome::ack(InboxStatus::Unmatched));
    };
    // Duplicates (Calendly retries, our own redeliveries) of finished work change nothing.
    if resolved.inbox_status.is_some_and(InboxStatus::is_final) {
        return Ok(Outcome::ack(InboxStatus::Processed));
    }
    let connection = resolved.connection;
    if connection.status == ConnectionStatus::NeedsReauth {
        return Ok(Outcome::Ack { status: InboxStatus::AwaitingReauth, note: connection.last_error });
    }
    // Judged only now: a delivery for nobody we know is parked above, never dead.
    let change = change.map_err(|reason| ProcessError::Permanent(reason.clone()))?;

    apply(deps, delivery, webhook, &connection, change).await?;
    let latency = (OffsetDateTime::now_utc() - delivery.received_at).as_seconds_f64().max(0.0);
    metrics::histogram!("calsync_webhook_end_to_end_seconds").record(latency);
    Ok(Outcome::ack(InboxStatus::Processed))
}

/// Fetches the event with the connection's own token and writes meeting, invitee and inbox row in
/// one transaction (with other deliveries' rows, see [`crate::writer`]).
async fn apply(
    Deps { events, writer, .. }: &Deps,
    delivery: &Incoming,
    webhook: &Webhook,
    connection: &Connection,
    change: &InviteeChange,
) -> Result<(), ProcessError> {
    let invitee = &change.invitee;
    let event = events.get_event(connection, &invitee.event, change.event_updated_at).await?;
    // Neither the invitee URI nor its event is taken from the body on trust.
    let invitee_row = MeetingInvitee::of_event(&event, invitee).map_err(|e| ProcessError::Permanent(e.to_string()))?;
    let write = Write {
        connection: connection.clone(),
        meeting: Meeting::from_event(&event),
        invitee: invitee_row,
        inbox: ProcessedDelivery {
            message_id: delivery.message_id.clone(),
            event: webhook.event.clone(),
            created_by: webhook.created_by.as_str().to_owned(),
            received_at: delivery.received_at,
            attempts: delivery.attempt as i32,
        },
    };
    if writer.write(write).await? == Applied::ConnectionChanged {
        return Err(ProcessError::transient("the connection changed while processing; resolving again"));
    }
    tracing::debug!(kind = ?change.kind, user_id = %connection.user_id, "webhook applied");
    Ok(())
}

/// The one place a webhook's outcome reaches the inbox. `processed` is not written here: it commits
/// in the same transaction as the rows (or already did, for a duplicate). A parked delivery whose
/// inbox row cannot be written is not acked: it is retried like any database failure.
async fn record(deps: &Deps, delivery: &Incoming, webhook: Option<&Webhook>, outcome: Outcome) -> Outcome {
    // A body that is not a whole envelope may still name its event: operators listing dead
    // letters (`calsync-worker dead`, which reads the inbox) should see it.
    let routing_key = if webhook.is_none() { message::webhook_routing_key(&delivery.body) } else { String::new() };
    let event = webhook.map(|w| w.event.as_str()).or_else(|| routing_key.strip_prefix("webhook.calendly."));
    let outcome = match outcome {
        Outcome::Ack { status, note } if status != InboxStatus::Processed => {
            match inbox::record(&deps.pool, &inbox_row(delivery, webhook, event, status, note.as_deref())).await {
                Ok(()) => Outcome::Ack { status, note },
                Err(error) => outcome::decide(error.into(), delivery.attempt, deps.max_attempts),
            }
        }
        other => other,
    };
    if let Outcome::Dead { reason } = &outcome {
        // Best effort: the dead letter itself carries the reason even when the database is what failed.
        let row = inbox_row(delivery, webhook, event, InboxStatus::Dead, Some(reason));
        if let Err(error) = inbox::record(&deps.pool, &row).await {
            tracing::warn!(%error, "could not record a dead delivery in the inbox");
        }
    }
    outcome
}

fn inbox_row<'a>(
    delivery: &'a Incoming,
    webhook: Option<&'a Webhook>,
    event: Option<&'a str>,
    status: InboxStatus,
    last_error: Option<&'a str>,
) -> InboxRecord<'a> {
    InboxRecord {
        message_id: &delivery.message_id,
        event,
        created_by: webhook.map(|w| w.created_by.as_str()),
        received_at: delivery.received_at,
        status,
        attempts: delivery.attempt as i32,
        last_error,
        body: &delivery.body,
        traceparent: delivery.traceparent(),
    }
}
