//! What goes on the wire: routing keys, properties and headers of calsync's messages. The only
//! module that knows header names and routing keys: the worker reads a delivery once into an
//! [`Incoming`], and everything it publishes is built by a constructor here (webhook, sync job,
//! retry, dead letter, revived dead letter).

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::queue::topology::{RetryTarget, Topology};

/// Header carrying ingest's receive time in milliseconds (AMQP's `timestamp` is whole seconds,
/// too coarse for the end-to-end latency metric).
pub const RECEIVED_AT_MS_HEADER: &str = "x-received-at-ms";
/// Header counting failed processing attempts across delayed redeliveries.
pub const ATTEMPTS_HEADER: &str = "x-attempts";
pub const DEATH_REASON_HEADER: &str = "x-death-reason";
pub const LAST_ERROR_HEADER: &str = "x-last-error";
/// Routing key of every sync job (bound to `calsync.sync` by `sync.#`).
const SYNC_ROUTING_KEY: &str = "sync.calendly.backfill";
/// Headers that describe one life of a message (our attempt count and reasons, the broker's own
/// dead-lettering and delivery-count bookkeeping): a revived dead letter starts without them.
const BOOKKEEPING_HEADERS: &[&str] = &[
    ATTEMPTS_HEADER,
    DEATH_REASON_HEADER,
    LAST_ERROR_HEADER,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-delivery-count",
];
/// AMQP header values are bounded; keep reasons readable and small.
const MAX_REASON_CHARS: usize = 1000;

/// A message ready to publish to the main exchange.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// W3C trace context of the trace a message belongs to (`crate::traces` writes and reads it).
/// Copied into every retry copy and dead letter with the other headers, and kept in the inbox for
/// replays of parked deliveries.
pub const TRACEPARENT_HEADER: &str = "traceparent";

impl Outgoing {
    /// The `message_id` property (every constructor here sets one).
    pub fn message_id(&self) -> &str {
        self.properties.message_id().as_ref().map_or("", |id| id.as_str())
    }

    /// This message as part of the trace `traceparent` names (a replay of a parked delivery).
    pub fn continuing(self, traceparent: Option<&str>) -> Self {
        let Some(traceparent) = traceparent else { return self };
        let value = AMQPValue::LongString(LongString::from(traceparent.to_owned()));
        Self { properties: with_headers(&self.properties, &[(TRACEPARENT_HEADER, value)]), ..self }
    }
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

/// Header of a change on `calsync.changes`: whose change it is, so an app can route or filter
/// without reading the body.
pub const USER_ID_HEADER: &str = "user_id";

/// A committed change for `calsync.changes`: routing key = kind, `message_id` = `change_id`, the
/// change (with its cursor) as the JSON body.
pub fn change(change: &crate::db::changes::Change) -> Outgoing {
    let body = serde_json::to_vec(change).expect("a change serialises");
    let mut headers = FieldTable::default();
    headers.insert(USER_ID_HEADER.into(), AMQPValue::LongString(LongString::from(change.user_id.to_string())));
    let properties = BasicProperties::default()
        .with_message_id(change.change_id.to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(change.occurred_at.unix_timestamp().max(0) as u64)
        .with_headers(headers);
    Outgoing { routing_key: change.kind.as_str().into(), body, properties }
}

/// What a job on `calsync.sync` does for its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncKind {
    /// After a connect: everything from the look-back window on.
    #[default]
    Backfill,
    /// The periodic pass that catches what webhooks missed.
    Reconcile,
    /// Asked for: by an operator, or after a broken subscription was replaced.
    Resync,
    /// Read the connection's subscription at Calendly and replace it when it is disabled or gone.
    CheckSubscription,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backfill => "backfill",
            Self::Reconcile => "reconcile",
            Self::Resync => "resync",
            Self::CheckSubscription => "check_subscription",
        }
    }
}

/// A job for one connection, on `calsync.sync`. Backfill, resync and reconciliation are one
/// mechanism: a pass over the connection's events, page by page, that fetches what differs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyncJob {
    pub connection_id: uuid::Uuid,
    #[serde(default)]
    pub kind: SyncKind,
    /// Where an interrupted pass continues (absent: a pass starting now, from the first page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<SyncResume>,
}

impl SyncJob {
    pub fn new(connection_id: uuid::Uuid, kind: SyncKind) -> Self {
        Self { connection_id, kind, resume: None }
    }
}

/// The page a pass reached, and when the pass began (what `last_synced_at` becomes once it ends).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyncResume {
    /// The page to (re)do; `None` = the first. A page is redone whole: what it already wrote now
    /// matches Calendly and costs no further call.
    pub page_token: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
}

fn sync_properties(job: &SyncJob) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(format!("sync-{}-{}", job.connection_id, uuid::Uuid::new_v4()).into())
        .with_content_type("application/json".into())
        // 2 = persistent: a queued sync job survives a broker restart.
        .with_delivery_mode(2)
        .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64)
}

pub fn sync_job(job: &SyncJob) -> Outgoing {
    let body = serde_json::to_vec(job).expect("a sync job serialises");
    Outgoing { routing_key: SYNC_ROUTING_KEY.into(), body, properties: sync_properties(job) }
}

/// The rest of an interrupted pass, through `calsync.sync`'s delay queue of `tier`. A new message
/// with no failed attempts: the pass made progress, and waiting for a rate-limit window is not a
/// failure, so a long pass on a small budget is never dead-lettered for taking many windows.
pub fn sync_continuation(job: &SyncJob, tier: usize) -> Outgoing {
    let body = serde_json::to_vec(job).expect("a sync job serialises");
    Outgoing {
        routing_key: Topology::retry_routing_key(RetryTarget::Sync, tier),
        body,
        properties: sync_properties(job),
    }
}

/// A delivery as the worker sees it, read once from the AMQP message.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub message_id: String,
    /// 1 for the first try; grows with every delayed redelivery.
    pub attempt: u32,
    /// Ingest's receive time (for the inbox and the end-to-end latency).
    pub received_at: OffsetDateTime,
    pub body: Vec<u8>,
    /// Carried into retries and dead letters, so they keep the original's identity and headers.
    properties: BasicProperties,
}

impl Incoming {
    pub fn read(delivery: &Delivery) -> Self {
        let properties = &delivery.properties;
        let failed = int_header(properties, ATTEMPTS_HEADER).unwrap_or(0).max(0) as u32;
        let received_at = int_header(properties, RECEIVED_AT_MS_HEADER)
            .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
            .or_else(|| properties.timestamp().and_then(|s| OffsetDateTime::from_unix_timestamp(s as i64).ok()))
            .unwrap_or_else(OffsetDateTime::now_utc);
        Self {
            message_id: properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_else(|| message_id(&delivery.data)),
            attempt: failed + 1,
            received_at,
            body: delivery.data.clone(),
            properties: properties.clone(),
        }
    }

    /// The trace context this delivery carries, if it is a well-formed header value (a
    /// `traceparent` is 55 visible ASCII characters; a longer future version is kept up to 256).
    pub fn traceparent(&self) -> Option<&str> {
        match self.properties.headers().as_ref()?.inner().get(TRACEPARENT_HEADER)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes())
                .ok()
                .filter(|v| v.len() <= 256 && v.bytes().all(|b| b.is_ascii_graphic())),
            _ => None,
        }
    }

    /// A copy for `target`'s retry queue of delay `tier`, counting this attempt as failed.
    pub fn retry(&self, target: RetryTarget, tier: usize, reason: &str) -> Outgoing {
        let reason = text(&truncate(reason));
        Outgoing {
            routing_key: Topology::retry_routing_key(target, tier),
            body: self.body.clone(),
            properties: with_headers(
                &self.properties,
                &[(ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(self.attempt))), (LAST_ERROR_HEADER, reason)],
            ),
        }
    }

    /// A copy for `target`'s retry queue of delay `tier` that does not count as an attempt: the
    /// delivery was put off (its user's API budget is spent), not failed.
    pub fn deferred(&self, target: RetryTarget, tier: usize, reason: &str) -> Outgoing {
        let reason = text(&truncate(reason));
        let failed = i64::from(self.attempt.saturating_sub(1));
        Outgoing {
            routing_key: Topology::retry_routing_key(target, tier),
            body: self.body.clone(),
            properties: with_headers(
                &self.properties,
                &[(ATTEMPTS_HEADER, AMQPValue::LongLongInt(failed)), (LAST_ERROR_HEADER, reason)],
            ),
        }
    }

    /// A copy for `calsync.dead`, saying why it can never succeed.
    pub fn dead_letter(&self, target: RetryTarget, reason: &str) -> Outgoing {
        let reason = text(&truncate(reason));
        Outgoing {
            routing_key: Topology::dead_routing_key(target),
            body: self.body.clone(),
            properties: with_headers(
                &self.properties,
                &[
                    (ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(self.attempt))),
                    (DEATH_REASON_HEADER, reason.clone()),
                    (LAST_ERROR_HEADER, reason),
                ],
            ),
        }
    }
}

/// A dead letter made new (`replay-dead`): back to the work queue it died in, with a fresh attempt
/// count. Returns that queue too.
pub fn revived(dead: &Delivery) -> (RetryTarget, Outgoing) {
    let target = Topology::target_of_dead_letter(dead.routing_key.as_str());
    let routing_key = match target {
        RetryTarget::Webhooks => webhook_routing_key(&dead.data),
        RetryTarget::Sync => SYNC_ROUTING_KEY.to_owned(),
    };
    let headers = dead.properties.headers().clone().unwrap_or_default();
    let kept: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(name, _)| !BOOKKEEPING_HEADERS.contains(&name.as_str()))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let properties = dead.properties.clone().with_headers(FieldTable::from(kept));
    (target, Outgoing { routing_key, body: dead.data.clone(), properties })
}

fn truncate(reason: &str) -> String {
    reason.chars().take(MAX_REASON_CHARS).collect()
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
fn with_headers(properties: &BasicProperties, set: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (name, value) in set {
        headers.insert((*name).into(), value.clone());
    }
    properties.clone().with_headers(headers)
}

/// A string header value.
fn text(value: &str) -> AMQPValue {
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

    fn delivery(routing_key: &str, body: &[u8], headers: &[(&str, AMQPValue)]) -> Delivery {
        let mut delivery = Delivery::mock(1, "calsync".into(), routing_key.into(), false, body.to_vec());
        delivery.properties = with_headers(&webhook(body.to_vec(), OffsetDateTime::now_utc()).properties, headers);
        delivery
    }

    #[test]
    fn a_retry_counts_the_failed_attempt_and_keeps_identity_and_body() {
        let first = Incoming::read(&delivery("webhook.calendly.invitee.created", b"{}", &[]));
        assert_eq!(first.attempt, 1);

        let retry = first.retry(RetryTarget::Webhooks, 1, "503 from Calendly");
        let mut again = delivery(&retry.routing_key, &retry.body, &[]);
        again.properties = retry.properties.clone();
        let second = Incoming::read(&again);

        assert_eq!(retry.routing_key, "retry.webhooks.5s");
        assert_eq!(second.attempt, 2);
        assert_eq!(second.message_id, first.message_id);
        assert_eq!(second.received_at, first.received_at);
        assert_eq!(str_header(&retry.properties, LAST_ERROR_HEADER).as_deref(), Some("503 from Calendly"));
    }

    #[test]
    fn a_deferred_delivery_keeps_its_attempt_count() {
        let second = Incoming::read(&delivery(
            "webhook.calendly.invitee.created",
            b"{}",
            &[(ATTEMPTS_HEADER, AMQPValue::LongLongInt(1))],
        ));
        let deferred = second.deferred(RetryTarget::Webhooks, 3, "budget spent");
        let mut again = delivery(&deferred.routing_key, &deferred.body, &[]);
        again.properties = deferred.properties.clone();
        assert_eq!(Incoming::read(&again).attempt, 2);
        assert_eq!(deferred.routing_key, "retry.webhooks.60s");
    }

    #[test]
    fn a_sync_job_from_before_kinds_and_resumes_reads_as_a_fresh_backfill() {
        let id = uuid::Uuid::new_v4();
        let job: SyncJob = serde_json::from_str(&format!(r#"{{"connection_id":"{id}"}}"#)).unwrap();
        assert_eq!(job, SyncJob::new(id, SyncKind::Backfill));
        let resumed = SyncJob {
            resume: Some(SyncResume { page_token: Some("p2".into()), started_at: OffsetDateTime::UNIX_EPOCH }),
            ..SyncJob::new(id, SyncKind::Reconcile)
        };
        let copy = sync_continuation(&resumed, 1);
        assert_eq!(copy.routing_key, "retry.sync.5s");
        assert_eq!(serde_json::from_slice::<SyncJob>(&copy.body).unwrap(), resumed);
        assert_eq!(int_header(&copy.properties, ATTEMPTS_HEADER), None);
    }

    #[test]
    fn a_dead_letter_says_why_in_bounded_headers() {
        let incoming = Incoming::read(&delivery("webhook.calendly.invitee.created", b"{}", &[]));
        let dead = incoming.dead_letter(RetryTarget::Sync, &"x".repeat(5000));
        assert_eq!(dead.routing_key, "dead.sync");
        assert_eq!(str_header(&dead.properties, DEATH_REASON_HEADER).unwrap().len(), MAX_REASON_CHARS);
    }

    #[test]
    fn a_revived_dead_letter_returns_to_its_queue_without_its_old_bookkeeping() {
        let body = br#"{"event":"invitee.canceled"}"#;
        let headers = [
            (ATTEMPTS_HEADER, AMQPValue::LongLongInt(8)),
            (DEATH_REASON_HEADER, text("gave up")),
            ("x-delivery-count", AMQPValue::LongLongInt(3)),
        ];
        let (target, copy) = revived(&delivery("dead.webhooks", body, &headers));
        assert_eq!(target, RetryTarget::Webhooks);
        assert_eq!(copy.routing_key, "webhook.calendly.invitee.canceled");
        assert_eq!(int_header(&copy.properties, ATTEMPTS_HEADER), None);
        assert_eq!(str_header(&copy.properties, DEATH_REASON_HEADER), None);
        assert!(int_header(&copy.properties, RECEIVED_AT_MS_HEADER).is_some(), "its receive time survives");

        let (target, copy) = revived(&delivery("dead.sync", b"{}", &headers));
        assert_eq!((target, copy.routing_key.as_str()), (RetryTarget::Sync, SYNC_ROUTING_KEY));
    }

    #[test]
    fn message_id_is_the_hex_sha256_of_the_body() {
        assert_eq!(message_id(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
