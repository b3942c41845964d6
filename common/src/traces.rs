//! OpenTelemetry traces: the exporter (only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and the W3C
//! trace context carried in AMQP headers, so one webhook is one trace from ingest's POST through the
//! queue, every retry copy, the dead letter and any replay.
//!
//! Off by default and free when off: no OpenTelemetry layer is installed, and every function here
//! returns at once when [`enabled`] is false (no context lookup, no header written).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// W3C trace context headers, as AMQP headers of the same names.
const TRACE_HEADERS: [&str; 2] = [crate::queue::message::TRACEPARENT_HEADER, "tracestate"];

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported by this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub(crate) fn set_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// The OTLP/HTTP (protobuf) exporter the standard `OTEL_*` variables describe, batched, or `None`
/// when neither `OTEL_EXPORTER_OTLP_ENDPOINT` nor `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
pub fn provider_from_env(service: &'static str) -> anyhow::Result<Option<SdkTracerProvider>> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    // The batch processor exports from a thread of its own, so the client is reqwest's blocking one,
    // built (like any blocking client) outside the async runtime, with calsync's TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = std::thread::spawn(|| reqwest::blocking::Client::builder().build())
        .join()
        .map_err(|_| anyhow::anyhow!("building the OTLP HTTP client panicked"))??;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .build()?;
    Ok(Some(SdkTracerProvider::builder().with_resource(resource(service)).with_batch_exporter(exporter).build()))
}

/// `service.name` = the binary's name.
pub fn resource(service: &'static str) -> Resource {
    Resource::builder().with_service_name(service).build()
}

/// `properties` with `span`'s trace context added as `traceparent` (and `tracestate`) headers.
pub fn inject(span: &tracing::Span, properties: BasicProperties) -> BasicProperties {
    if !enabled() {
        return properties;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return properties;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut Carrier(&mut carrier));
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (name, value) in carrier {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    properties.with_headers(headers)
}

/// Makes `span` (not yet entered) a child of the span whose context `properties` carry, if any.
pub fn continue_from(span: &tracing::Span, properties: &BasicProperties) {
    if !enabled() {
        return;
    }
    let Some(headers) = properties.headers() else { return };
    let context = TraceContextPropagator::new().extract(&Headers(headers));
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Links `span` to `other` (a batch commit to each delivery it holds).
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    if !enabled() {
        return;
    }
    let context = other.context().span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}

struct Carrier<'a>(&'a mut HashMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Headers<'a>(&'a FieldTable);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        TRACE_HEADERS.iter().copied().filter(|name| self.0.inner().contains_key(*name)).collect()
    }
}

tokio::task_local! {
    /// The delivery a task works on, for spans opened deep inside it (a Calendly call).
    static MESSAGE_ID: String;
}

/// Runs `work` as the processing of `message_id`: spans opened inside it say so.
pub async fn for_message<F: std::future::Future>(message_id: &str, work: F) -> F::Output {
    if enabled() { MESSAGE_ID.scope(message_id.to_owned(), work).await } else { work.await }
}

/// Records the delivery the current task works on (see [`for_message`]) as `span`'s
/// `message_id` (a field the span declares empty).
pub fn record_message_id(span: &tracing::Span) {
    let _ = MESSAGE_ID.try_with(|message_id| span.record("message_id", message_id.as_str()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_traces_off_a_message_gets_no_trace_header_and_a_span_no_parent() {
        // No subscriber with an OpenTelemetry layer in this test binary: traces are off.
        assert!(!enabled());
        let properties = BasicProperties::default();
        let span = tracing::info_span!("any");
        assert!(inject(&span, properties.clone()).headers().is_none());
        let mut headers = FieldTable::default();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent".into(), AMQPValue::LongString(LongString::from(parent)));
        continue_from(&span, &properties.with_headers(headers));
        assert!(!span.context().span().span_context().is_valid());
    }
}
