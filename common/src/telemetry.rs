//! Logs and metrics setup, shared by every binary.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the tracing subscriber. `RUST_LOG` filters (default `info`); the format is pretty for
/// people or JSON for log pipelines. Safe to call more than once (later calls are ignored), which
/// lets tests start several apps in one process.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Pretty => registry.with(fmt::layer().with_target(false)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().flatten_event(true)).try_init(),
    };
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
