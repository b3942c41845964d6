//! What goes on the wire: routing keys, properties and headers of calsync's messages.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Header carrying ingest's receive time in milliseconds (AMQP's `timestamp` is whole seconds,
/// too coarse for the end-to-end latency metric).
pub const RECEIVED_AT_MS_HEADER: &str = "x-received-at-ms";
/// Header counting failed processing attempts across delayed redeliveries.
pub const ATTEMPTS_HEADER: &str = "x-attempts";
pub const DEATH_REASON_HEADER: &str = "x-death-reason";
pub const LAST_ERROR_HEADER: &str = "x-last-error";

/// A message ready to publish to the main exchange.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// Lowercase hex SHA-256 of the body: the delivery's identity for dedup and the inbox.
pub fn message_id(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// `webhook.calendly.<event>`, or `.unknown` when the body has no readable `event`. Only
/// `[a-z0-9_.]` survives so a hostile event name cannot inject routing-key wildcards.
pub fn webhook_routing_key(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct EventOnly {
        event: Option<serde_json::Value>,
    }
    let event = serde_json::from_slice::<EventOnly>(body)
        .ok()
        .and_then(|e| e.event)
        .and_then(|e| e.as_str().map(str::to_owned))
        .filter(|e| {
            !e.is_empty()
                && e.len() <= 100
                && e.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
        })
        .filter(|e| !e.starts_with('.') && !e.ends_with('.') && !e.contains(".."))
        .unwrap_or_else(|| "unknown".to_owned());
    format!("webhook.calendly.{event}")
}

/// The message ingest publishes for an authentic webhook: the body exactly as received.
pub fn webhook(body: Vec<u8>, received_at: OffsetDateTime) -> Outgoing {
    let mut headers = FieldTable::default();
    let received_ms = (received_at.unix_timestamp_nanos() / 1_000_000) as i64;
    headers.insert(RECEIVED_AT_MS_HEADER.into(), AMQPValue::LongLongInt(received_ms));
    let properties = BasicProperties::default()
        .with_message_id(message_id(&body).into())
        .with_content_type("application/json".into())
        // 2 = persistent: written to disk, survives a broker restart.
        .with_delivery_mode(2)
        .with_timestamp(received_at.unix_timestamp().max(0) as u64)
        .with_headers(headers);
    Outgoing { routing_key: webhook_routing_key(&body), body, properties }
}

/// A backfill job for one connection, on `calsync.sync`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SyncJob {
    pub connection_id: uuid::Uuid,
}

pub fn sync_job(job: &SyncJob) -> Outgoing {
    let body = serde_json::to_vec(job).expect("a sync job serialises");
    let properties = BasicProperties::default()
        .with_message_id(format!("sync-{}-{}", job.connection_id, uuid::Uuid::new_v4()).into())
        .with_content_type("application/json".into())
        // 2 = persistent: a queued backfill survives a broker restart.
        .with_delivery_mode(2)
        .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64);
    Outgoing { routing_key: "sync.calendly.backfill".into(), body, properties }
}

/// Reads an integer header, whatever integer width the sender used.
pub fn int_header(properties: &BasicProperties, name: &str) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// Reads a string header.
pub fn str_header(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(v) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        AMQPValue::ShortString(v) => Some(v.as_str().to_owned()),
        _ => None,
    }
}

/// Copies `properties` with some headers replaced.
pub fn with_headers(properties: &BasicProperties, set: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (name, value) in set {
        headers.insert((*name).into(), value.clone());
    }
    properties.clone().with_headers(headers)
}

/// A string header value.
pub fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_key_names_the_event_or_unknown() {
        assert_eq!(webhook_routing_key(br#"{"event":"invitee.created"}"#), "webhook.calendly.invitee.created");
        assert_eq!(
            webhook_routing_key(br#"{"event":"invitee_no_show.deleted","x":1}"#),
            "webhook.calendly.invitee_no_show.deleted"
        );
        assert_eq!(webhook_routing_key(b"not json"), "webhook.calendly.unknown");
        assert_eq!(webhook_routing_key(br#"{"event":"a.#"}"#), "webhook.calendly.unknown");
        assert_eq!(webhook_routing_key(br#"{"event":7}"#), "webhook.calendly.unknown");
        assert_eq!(webhook_routing_key(br#"{"payload":{}}"#), "webhook.calendly.unknown");
    }

    #[test]
    fn message_id_is_the_hex_sha256_of_the_body() {
        assert_eq!(message_id(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
