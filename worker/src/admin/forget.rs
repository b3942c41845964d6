//! `calsync-worker forget <email>`: erase one invitee's personal data wherever calsync holds it (a
//! data deletion request: Calendly's own deletion never reaches our copy).
//!
//! What is erased, for the invitee whose email is exactly `<email>` (case-insensitive):
//! - their invitee rows: email, name, who canceled and why;
//! - their meetings' locations that came from them (`outbound_call`: their phone;
//!   `ask_invitee`: what they typed) or that name their email, and a cancel reason they gave;
//! - kept webhook bodies (parked or dead deliveries) that name their email;
//! - webhook bodies waiting in `calsync.dead` and the delay queues that name their email: each is
//!   replaced by a copy with their data taken out;
//! - and a tombstone is kept (the SHA-256 of the lowercased email, not the email) that every later
//!   write honours, so a replayed dead letter or a retried delivery cannot write them back.
//!
//! Matching is exact, on the parsed address: `forget bo@example.com` never touches
//! `jimbo@example.com`, and an empty or malformed address is refused before anything is read.

use std::fmt;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use sqlx::PgPool;

use calsync_common::db::forgotten;
use calsync_common::queue::{Broker, Outgoing, RetryTarget};

/// An email address as `forget` matches it: trimmed, lowercased, one `@` between a non-empty local
/// part and a dotted domain, no spaces or control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress(String);

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("{0:?} is not an email address; forget erases one person, named by their exact email")]
    NotAnEmail(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("RabbitMQ: {0}")]
    Broker(String),
}

impl EmailAddress {
    pub fn parse(input: &str) -> Result<Self, ForgetError> {
        let refuse = || ForgetError::NotAnEmail(input.to_owned());
        let address = input.trim().to_lowercase();
        let (local, domain) = address.split_once('@').ok_or_else(refuse)?;
        let well_formed = !local.is_empty()
            && !domain.contains('@')
            && domain.split('.').count() >= 2
            && domain.split('.').all(|label| !label.is_empty())
            && !address.chars().any(|c| c.is_whitespace() || c.is_control());
        if well_formed { Ok(Self(address)) } else { Err(refuse()) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `value` holds this address as one of its strings (exactly, ignoring case).
    fn is_named_in(&self, value: &Value) -> bool {
        match value {
            Value::String(s) => s.trim().eq_ignore_ascii_case(&self.0),
            Value::Array(items) => items.iter().any(|v| self.is_named_in(v)),
            Value::Object(fields) => fields.values().any(|v| self.is_named_in(v)),
            _ => false,
        }
    }

    /// True when the JSON `body` names this address.
    fn is_named_in_body(&self, body: &[u8]) -> bool {
        serde_json::from_slice::<Value>(body).is_ok_and(|v| self.is_named_in(&v))
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `forget` erased (or, with `--dry-run`, would erase).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Forgotten {
    pub invitees: u64,
    pub meetings: u64,
    pub inbox_bodies: u64,
    /// `None` when the queues were not looked into (a dry run).
    pub queued_bodies: Option<u64>,
}

impl fmt::Display for Forgotten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queued = self
            .queued_bodies
            .map_or("queued webhook bodies not looked at".to_owned(), |n| format!("{n} queued webhook body(ies)"));
        write!(
            f,
            "{} invitee row(s), {} meeting(s), {} kept webhook body(ies), {queued}",
            self.invitees, self.meetings, self.inbox_bodies
        )
    }
}

/// Erases `email` from the database (one transaction, rolled back on `dry_run`), then from the
/// bodies waiting in `broker`'s dead-letter and delay queues. A dry run does not look into the
/// queues (`queued_bodies` is then `None`): looking means taking every message out.
pub async fn forget(
    pool: &PgPool,
    broker: Option<&Broker>,
    email: &EmailAddress,
    dry_run: bool,
) -> Result<Forgotten, ForgetError> {
    let mut forgotten = erase_rows(pool, email, dry_run).await?;
    if let Some(broker) = broker.filter(|_| !dry_run) {
        forgotten.queued_bodies = Some(erase_queued(broker, email).await?);
    }
    Ok(forgotten)
}

async fn erase_rows(pool: &PgPool, email: &EmailAddress, dry_run: bool) -> Result<Forgotten, ForgetError> {
    let email = email.clone();
    let mut tx = pool.begin().await?;
    forgotten::remember(&mut tx, email.as_str()).await?;
    // Their meetings first, while their invitee rows still say which meetings are theirs: a
    // location they gave (their phone, what they typed) and a cancel reason they wrote.
    let theirs = sqlx::query(
        "UPDATE meetings m SET \
             location = CASE WHEN m.location->>'type' IN ('outbound_call', 'ask_invitee') THEN NULL ELSE m.location END, \
             cancel_reason = CASE WHEN t.canceled_it THEN NULL ELSE m.cancel_reason END, updated_at = now() \
         FROM (SELECT meeting_id, bool_or(canceler_type = 'invitee') AS canceled_it \
               FROM meeting_invitees WHERE lower(email) = $1 GROUP BY meeting_id) t \
         WHERE m.id = t.meeting_id \
           AND (m.location->>'type' IN ('outbound_call', 'ask_invitee') \
                OR (t.canceled_it AND m.cancel_reason IS NOT NULL))",
    )
    .bind(email.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Any location that names their email as one of its values (not as a substring of another).
    let naming = sqlx::query(
        "UPDATE meetings SET location = NULL, updated_at = now() \
         WHERE location IS NOT NULL AND strpos(lower(location::text), $1) > 0 \
           AND EXISTS (SELECT 1 FROM jsonb_path_query(location, 'strict $.**') v \
                       WHERE jsonb_typeof(v) = 'string' AND lower(btrim(v #>> '{}')) = $1)",
    )
    .bind(email.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let invitees = sqlx::query(
        "UPDATE meeting_invitees SET email = NULL, name = NULL, canceled_by = NULL, cancel_reason = NULL, \
             updated_at = now() \
         WHERE lower(email) = $1",
    )
    .bind(email.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Kept bodies: a substring finds candidates, the parsed JSON decides (exact values only).
    let candidates: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT message_id, body FROM webhook_inbox \
         WHERE body IS NOT NULL AND strpos(lower(convert_from(body, 'UTF8')), $1) > 0",
    )
    .bind(email.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let named: Vec<String> =
        candidates.into_iter().filter(|(_, body)| email.is_named_in_body(body)).map(|(id, _)| id).collect();
    let inbox_bodies = sqlx::query("UPDATE webhook_inbox SET body = NULL WHERE message_id = ANY($1)")
        .bind(&named)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(Forgotten { invitees, meetings: theirs + naming, inbox_bodies, queued_bodies: None })
}

/// Replaces every body in the dead-letter and delay queues that names `email` by a copy with the
/// person taken out (same routing key and headers, confirmed before the original is acked).
///
/// No message is ever handed back to its queue: on RabbitMQ's quorum queues every return counts
/// as a delivery (on 4.0–4.2 with a default limit of 20), and `calsync.dead` has nowhere to send a
/// letter over the limit. So every message taken is republished — rewritten, or unchanged when it
/// does not name the person — before the original is acked: a fresh copy, nothing spent.
async fn erase_queued(broker: &Broker, email: &EmailAddress) -> Result<u64, ForgetError> {
    let topology = broker.topology().clone();
    let mut queues = vec![topology.dead_queue()];
    for target in [RetryTarget::Webhooks, RetryTarget::Sync] {
        queues
            .extend((0..calsync_common::retry::REDELIVERY_DELAYS.len()).map(|tier| topology.retry_queue(target, tier)));
    }
    let failed = |e: lapin::Error| ForgetError::Broker(e.to_string());
    let mut erased = 0;
    for queue in queues {
        let channel = broker.open_channel().await.map_err(|e| ForgetError::Broker(e.to_string()))?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let waiting = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .map_err(failed)?
            .message_count();
        // Only what is there now: the copies we publish go to the back and are not read again.
        for _ in 0..waiting {
            let got =
                channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await.map_err(failed)?;
            let Some(got) = got else { break };
            let delivery = got.delivery;
            let names_them = email.is_named_in_body(&delivery.data);
            let copy = Outgoing {
                routing_key: delivery.routing_key.to_string(),
                body: if names_them { redact(&delivery.data, email) } else { delivery.data.clone() },
                properties: delivery.properties.clone(),
            };
            broker.publish(&copy).await.map_err(|e| ForgetError::Broker(e.to_string()))?;
            delivery.acker.ack(BasicAckOptions::default()).await.map_err(failed)?;
            erased += u64::from(names_them);
        }
        let _ = channel.close(200, "forget".into()).await;
    }
    Ok(erased)
}

/// `body` with `email` taken out: every string equal to it becomes null, and where it is the
/// invitee's own email, the rest of what the invitee gave (name, phone, answers, cancellation),
/// and the email itself becomes the tombstone's marker, so the write this body eventually causes
/// still knows the person was erased (and erases the location they gave, for one).
fn redact(body: &[u8], email: &EmailAddress) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else { return body.to_vec() };
    if let Some(payload) = value.get_mut("payload").and_then(Value::as_object_mut)
        && payload.get("email").is_some_and(|e| email.is_named_in(e))
    {
        payload.insert("email".into(), Value::String(forgotten::marker(email.as_str())));
        for field in ["name", "first_name", "last_name", "text_reminder_number", "questions_and_answers"] {
            if payload.contains_key(field) {
                payload.insert(field.into(), Value::Null);
            }
        }
        if let Some(cancellation) = payload.get_mut("cancellation").and_then(Value::as_object_mut) {
            cancellation.insert("canceled_by".into(), Value::Null);
            cancellation.insert("reason".into(), Value::Null);
        }
    }
    null_strings(&mut value, email);
    serde_json::to_vec(&value).unwrap_or_else(|_| body.to_vec())
}

fn null_strings(value: &mut Value, email: &EmailAddress) {
    match value {
        Value::String(_) if email.is_named_in(value) => *value = Value::Null,
        Value::Array(items) => items.iter_mut().for_each(|v| null_strings(v, email)),
        Value::Object(fields) => fields.values_mut().for_each(|v| null_strings(v, email)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_address_is_accepted_and_matching_is_exact() {
        for refused in ["", "  ", "bo", "@example.com", "bo@", "bo@example", "bo@@example.com", "b o@example.com"] {
            assert!(EmailAddress::parse(refused).is_err(), "{refused:?}");
        }
        let bo = EmailAddress::parse(" Bo@Example.com ").unwrap();
        assert_eq!(bo.as_str(), "bo@example.com");
        assert!(bo.is_named_in(&serde_json::json!({ "a": ["BO@example.com"] })));
        assert!(!bo.is_named_in(&serde_json::json!({ "email": "jimbo@example.com" })));
    }

    #[test]
    fn a_redacted_body_keeps_the_event_and_loses_the_person() {
        let bo = EmailAddress::parse("bo@example.com").unwrap();
        let body = serde_json::json!({
            "event": "invitee.canceled",
            "payload": { "email": "bo@example.com", "name": "Bo", "uri": "u", "text_reminder_number": "+1 555",
                         "cancellation": { "canceled_by": "Bo", "reason": "sick" } }
        });
        let redacted: Value = serde_json::from_slice(&redact(&serde_json::to_vec(&body).unwrap(), &bo)).unwrap();
        assert_eq!(redacted["payload"]["uri"], "u");
        assert_eq!(redacted["event"], "invitee.canceled");
        for field in ["name", "text_reminder_number"] {
            assert!(redacted["payload"][field].is_null(), "{field}");
        }
        assert_eq!(redacted["payload"]["email"], calsync_common::db::forgotten::marker("bo@example.com"));
        assert!(redacted["payload"]["cancellation"]["reason"].is_null());
    }
}
