//! Traces across the queue, read back from the OpenTelemetry SDK's in-memory exporter (no
//! collector): ingest's request span is the root, the worker's processing span is the child of
//! ingest's publish through a real RabbitMQ (also for a retry copy, a dead letter replayed, and a
//! parked delivery replayed on reconnect), Calendly calls and the token refresh are its children,
//! the batch commit links to it, every span says which `message_id` it is about, and no span
//! attribute or event carries a token, a secret or the body.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use calendly_sim::FailNext;
use calsync_common::calendly::signature;
use calsync_common::config::LogFormat;
use calsync_common::db::connections;
use calsync_common::queue::message;
use calsync_common::{telemetry, traces};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use support::*;
use tokio_util::sync::CancellationToken;

/// The process-wide subscriber of this test binary, exporting every span to memory. Installed
/// before anything else logs (the harness's own `init_tracing` is then a no-op).
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_resource(traces::resource("calsync-test"))
            .with_simple_exporter(exporter.clone())
            .build();
        // Lives as long as the test binary.
        std::mem::forget(telemetry::install(LogFormat::Pretty, Some(provider), "calsync-test"));
        assert!(traces::enabled(), "no other subscriber was installed first");
        exporter
    })
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
}

fn message_id_of(span: &SpanData) -> Option<String> {
    attribute(&span.attributes, "message_id").map(|v| v.as_str().into_owned())
}

/// Finished spans about `message_id` (a batch's span names each of its deliveries).
fn spans_about(message_id: &str) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| message_id_of(s).is_some_and(|ids| ids.split(',').any(|id| id == message_id)))
        .collect()
}

/// Every `process` span of `spans` is a child of `publish`, in its trace.
fn assert_every_attempt_continues(spans: &[SpanData], publish: &SpanData, attempts: usize) {
    let processing = named(spans, "process");
    assert!(processing.len() >= attempts, "{attempts} attempts, got {}", processing.len());
    for span in &processing {
        assert_eq!(span.span_context.trace_id(), publish.span_context.trace_id());
        assert_eq!(span.parent_span_id, publish.span_context.span_id(), "every attempt is the publish's child");
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// Waits until `count` processing spans of `message_id` have ended, and its batch commit.
async fn wait_for_spans(message_id: &str, processing: usize) -> Vec<SpanData> {
    calsync_testkit::wait_until(DEADLINE, "the delivery's spans exported", || async {
        let spans = spans_about(message_id);
        named(&spans, "process").len() >= processing && !named(&spans, "batch commit").is_empty()
    })
    .await;
    spans_about(message_id)
}

/// Ingest in this process, on the harness's database and topology, verifying with the simulator's
/// signing key.
struct Ingest {
    url: String,
    shutdown: CancellationToken,
}

impl Ingest {
    async fn start(h: &Harness) -> Self {
        use clap::Parser;
        let key = &h.sim.sim.config().signing_key;
        let settings = calsync_ingest::settings::IngestSettings::try_parse_from([
            "calsync-ingest".to_owned(),
            "--ingest-addr=127.0.0.1:0".into(),
            format!("--calendly-webhook-signing-keys={key}"),
            format!("--amqp-url={}", calsync_testkit::amqp_url()),
            format!("--amqp-topology-prefix={}", h.topology.prefix),
            format!("--database-url={}", h.db_url),
            format!("--token-encryption-key={}", h.key),
        ])
        .unwrap();
        let shutdown = CancellationToken::new();
        let app = calsync_ingest::Application::build(settings, shutdown.clone()).await.unwrap();
        let url = format!("http://{}/webhooks/calendly", app.local_addr());
        let broker = app.state().broker.clone();
        tokio::spawn(app.run_until_stopped());
        assert!(broker.wait_ready(Duration::from_secs(10)).await, "ingest connected to RabbitMQ");
        Self { url, shutdown }
    }

    /// POSTs `body` signed as Calendly would; returns its message id.
    async fn post(&self, h: &Harness, body: &[u8]) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let signed = signature::sign(h.sim.sim.config().signing_key.as_bytes(), now, body);
        let response = reqwest::Client::new()
            .post(&self.url)
            .header(signature::HEADER, signed)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        message::message_id(body)
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The root span ingest made for `message_id`, and its publish span under it.
fn ingest_spans(spans: &[SpanData]) -> (&SpanData, &SpanData) {
    let receive = named(spans, "POST /webhooks/calendly");
    assert_eq!(receive.len(), 1, "one request span");
    let receive = receive[0];
    assert_eq!(receive.parent_span_id, SpanId::INVALID, "ingest's request span is a root");
    let publish = named(spans, "publish calsync");
    assert_eq!(publish.len(), 1, "one publish span");
    let publish = publish[0];
    assert_eq!(publish.parent_span_id, receive.span_context.span_id());
    assert_eq!(publish.span_context.trace_id(), receive.span_context.trace_id());
    (receive, publish)
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn one_webhook_is_one_trace_from_ingest_through_the_queue_with_calendly_calls_and_a_linked_batch(pool: PgPool) {
    exporter();
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ingest = Ingest::start(&h).await;
    let ada = h.connect("Ada").await;
    // Ada's token is refused once (401): the worker refreshes it inside the delivery.
    h.sim.sim.expire_tokens(&ada.uri).unwrap();
    let before = connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    h.book(&ada, 1);
    let body = h.captured().remove(0);
    let id = ingest.post(&h, &body).await;
    h.wait_for_inbox(std::slice::from_ref(&id), &["processed"]).await;

    let spans = wait_for_spans(&id, 1).await;
    let (receive, publish) = ingest_spans(&spans);
    let trace = receive.span_context.trace_id();
    let process = named(&spans, "process")[0];
    assert_eq!(process.span_context.trace_id(), trace, "the worker's span is in ingest's trace");
    assert_eq!(process.parent_span_id, publish.span_context.span_id(), "…as the child of the publish");
    assert_eq!(attribute(&process.attributes, "messaging.system").unwrap().as_str(), "rabbitmq");
    assert_eq!(attribute(&publish.attributes, "messaging.message.id").unwrap().as_str(), id.as_str());

    let calls = named(&spans, "get_event");
    assert!(!calls.is_empty(), "the event fetch is a span of its own");
    let refresh = named(&spans, "token refresh");
    assert_eq!(refresh.len(), 1, "the refresh is a span of its own");
    assert_eq!(refresh[0].parent_span_id, process.span_context.span_id());
    let token_call = named(&spans, "oauth_refresh");
    assert_eq!(token_call.len(), 1);
    assert_eq!(token_call[0].parent_span_id, refresh[0].span_context.span_id());
    for call in calls {
        assert_eq!(call.span_context.trace_id(), trace);
        assert_eq!(call.parent_span_id, process.span_context.span_id(), "Calendly calls are children");
    }

    let batch = named(&spans, "batch commit");
    assert_eq!(batch.len(), 1);
    let linked: Vec<_> = batch[0].links.iter().map(|l| l.span_context.span_id()).collect();
    assert!(linked.contains(&process.span_context.span_id()), "the batch links to the delivery: {linked:?}");
    assert_ne!(batch[0].span_context.trace_id(), TraceId::INVALID);

    // Every span of this trace says which delivery it is about.
    let all = exporter().get_finished_spans().unwrap();
    for span in all.iter().filter(|s| s.span_context.trace_id() == trace) {
        assert_eq!(message_id_of(span).as_deref(), Some(id.as_str()), "span {} has the message_id", span.name);
    }

    // No token, secret or body anywhere: the tokens before and after the refresh, the OAuth client
    // secret, the signing key, the token encryption key, and what the body holds.
    let after = connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    let mut secrets: Vec<String> = Vec::new();
    for row in [&before, &after] {
        secrets.push(row.decrypt_access(&h.cipher).unwrap().expose_secret().to_owned());
        secrets.push(row.decrypt_refresh(&h.cipher).unwrap().expose_secret().to_owned());
    }
    let config = h.sim.sim.config();
    secrets.extend([config.client_secret.clone(), config.signing_key.clone(), h.key.clone()]);
    let invitee_email =
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["payload"]["email"].as_str().unwrap().to_owned();
    secrets.push(invitee_email);
    secrets.push(String::from_utf8(body.clone()).unwrap());
    for span in &all {
        let mut texts: Vec<String> = span.attributes.iter().map(|kv| kv.value.as_str().into_owned()).collect();
        texts.push(span.name.to_string());
        for event in span.events.iter() {
            texts.push(event.name.to_string());
            texts.extend(event.attributes.iter().map(|kv| kv.value.as_str().into_owned()));
        }
        for secret in &secrets {
            assert!(texts.iter().all(|t| !t.contains(secret.as_str())), "span {} carries a secret", span.name);
        }
    }
    drop(ingest);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_retry_copy_and_a_replayed_dead_letter_stay_in_the_webhooks_trace(pool: PgPool) {
    exporter();
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ingest = Ingest::start(&h).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    let body = h.captured().remove(0);
    // More failures than one attempt's in-process retries absorb: a later attempt is a retry copy
    // from a delay queue, and it succeeds.
    h.sim.sim.fail_next(FailNext { endpoint: "get_event".into(), count: 10, status: 503 });
    let id = ingest.post(&h, &body).await;
    h.wait_for_inbox(std::slice::from_ref(&id), &["processed"]).await;
    let spans = wait_for_spans(&id, 2).await;
    let (_, publish) = ingest_spans(&spans);
    // The first attempt and at least one retry copy.
    assert_every_attempt_continues(&spans, publish, 2);

    // A second booking dies at once (Calendly refuses the event: a permanent failure), then
    // `replay-dead` revives it.
    h.book(&ada, 1);
    let body = h.captured().remove(0);
    h.sim.sim.fail_next(FailNext { endpoint: "get_event".into(), count: 1, status: 403 });
    let dead = ingest.post(&h, &body).await;
    h.wait_for_inbox(std::slice::from_ref(&dead), &["dead"]).await;
    calsync_testkit::wait_until(DEADLINE, "the dead letter", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;
    let moved = calsync_worker::admin::replay_dead::replay_dead(&h.pool, &h.publisher).await.unwrap();
    assert_eq!(moved, 1);
    h.wait_for_inbox(std::slice::from_ref(&dead), &["processed"]).await;
    let spans = wait_for_spans(&dead, 2).await;
    let (_, publish) = ingest_spans(&spans);
    assert_eq!(named(&spans, "process").len(), 2, "the attempt that died, then the replayed dead letter");
    assert_every_attempt_continues(&spans, publish, 2);
    drop(ingest);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_parked_delivery_replayed_on_reconnect_continues_its_trace(pool: PgPool) {
    exporter();
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ingest = Ingest::start(&h).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    let body = h.captured().remove(0);
    sqlx::query("DELETE FROM calendar_connections").execute(&h.pool).await.unwrap();
    let id = ingest.post(&h, &body).await;
    h.wait_for_inbox(std::slice::from_ref(&id), &["unmatched"]).await;

    // Ada connects (again): her parked delivery is published anew from the inbox.
    let app_user = uuid::Uuid::new_v4();
    let expires = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    h.store_tokens(app_user, &ada.calendly, expires).await;
    calsync_common::replay::replay_parked(&h.pool, &h.publisher, &ada.uri, 7).await.unwrap();
    h.wait_for_inbox(std::slice::from_ref(&id), &["processed"]).await;

    let spans = wait_for_spans(&id, 2).await;
    let (_, publish) = ingest_spans(&spans);
    assert_eq!(named(&spans, "process").len(), 2, "unmatched, then the replay");
    assert_every_attempt_continues(&spans, publish, 2);
    drop(ingest);
    h.stop().await;
}
