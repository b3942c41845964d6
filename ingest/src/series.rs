//! The series ingest exports from its first scrape, before anything has happened: the request
//! outcomes alerts and the dashboard rate over (see `ops/prometheus/`, `ops/grafana/`).

use calsync_common::telemetry::zero_counter;

/// Every `outcome` of `calsync_ingest_requests_total` (routes::webhooks and serve count them).
pub const REQUEST_OUTCOMES: [&str; 8] =
    ["accepted", "unauthorized", "too_large", "bad_request", "timeout", "unavailable", "overloaded", "error"];

pub fn register() {
    for outcome in REQUEST_OUTCOMES {
        zero_counter("calsync_ingest_requests_total", &[("outcome", outcome)]);
    }
    metrics::gauge!("calsync_ingest_in_flight_requests").increment(0.0);
    let _ = metrics::histogram!("calsync_ingest_publish_seconds");
}
