//! Logs and metrics setup, shared by every binary.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

use crate::config::LogFormat;
use crate::traces;

/// Installs the tracing subscriber. `RUST_LOG` filters (default `info`); the format is pretty for
/// people or JSON for log pipelines. Safe to call more than once (later calls are ignored), which
/// lets tests start several apps in one process.
pub fn init_tracing(format: LogFormat) {
    let _ = install(format, None, "calsync");
}

/// What a binary calls first: logs as [`init_tracing`], plus OpenTelemetry traces exported over
/// OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`service.name` = `service`). Keep the returned
/// handle until exit: dropping it flushes the spans not yet exported.
pub fn init(format: LogFormat, service: &'static str) -> Telemetry {
    let provider = match traces::provider_from_env(service) {
        Ok(provider) => provider,
        Err(error) => {
            eprintln!("{service}: traces are off: the OTLP exporter could not be built: {error:#}");
            None
        }
    };
    install(format, provider, service)
}

/// Installs logs and, with a `provider`, an OpenTelemetry layer exporting through it (tests pass
/// one with an in-memory exporter). The first call in a process wins.
pub fn install(format: LogFormat, provider: Option<SdkTracerProvider>, service: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Pretty => fmt::layer().with_target(false).boxed(),
        LogFormat::Json => fmt::layer().json().flatten_event(true).boxed(),
    };
    // Spans are exported whatever RUST_LOG says about logs: calsync's spans are at INFO.
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)).with_filter(LevelFilter::INFO));
    let installed = tracing_subscriber::registry().with(logs.with_filter(filter)).with(otel).try_init().is_ok();
    if installed && provider.is_some() {
        traces::set_enabled();
    }
    Telemetry { provider: provider.filter(|_| installed) }
}

/// Keeps the trace exporter of [`init`] alive.
#[must_use = "dropping it stops exporting traces"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("traces: the last spans may not have been exported: {error}");
        }
    }
}

/// Latency buckets in seconds, from a fast publish confirm to a slow Calendly call.
const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The process-wide Prometheus recorder. The `metrics` facade has one global recorder, so every
/// app started in this process (several, in tests) shares this handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(SECONDS_BUCKETS)
                .expect("static bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed in calsync binaries")
        })
        .clone()
}

/// Renders the Prometheus text exposition.
pub fn render_metrics() -> String {
    let handle = metrics_handle();
    // Without the exporter's own HTTP listener nothing else drains histogram buffers.
    handle.run_upkeep();
    handle.render()
}

/// Registers the counter `name{labels}` at zero. Prometheus sees a counter's first increment as an
/// increase only if the series existed before it: an alert on `increase(...[15m]) > 0` would miss
/// the first dead letter of a process's life without this.
pub fn zero_counter(name: &'static str, labels: &[(&'static str, &'static str)]) {
    let labels: Vec<metrics::Label> = labels.iter().map(|(key, value)| metrics::Label::new(*key, *value)).collect();
    metrics::counter!(name, labels).absolute(0);
}
