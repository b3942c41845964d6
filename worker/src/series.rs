//! The series a worker exports from its first scrape, before anything has happened: what the
//! alert rules and the dashboard (`ops/prometheus/`, `ops/grafana/`) count increases of.

use calsync_common::calendly::types::EventKind;
use calsync_common::telemetry::zero_counter;

/// Outcomes an alert or panel watches per event: a dead letter, a retry, a parked delivery.
const WATCHED_OUTCOMES: [&str; 4] = ["processed", "retry", "dead", "awaiting_reauth"];

pub fn register() {
    let events = EventKind::ALL.map(EventKind::as_str);
    for event in events.iter().copied().chain(["other", "unparseable", "sync"]) {
        for outcome in WATCHED_OUTCOMES {
            zero_counter("calsync_worker_deliveries_total", &[("event", event), ("outcome", outcome)]);
        }
    }
    for outcome in ["refreshed", "invalid_grant", "error", "stored_late", "lost"] {
        zero_counter("calsync_token_refreshes_total", &[("outcome", outcome)]);
    }
    zero_counter("calsync_calendly_budget_deferrals_total", &[]);
    zero_counter("calsync_worker_batch_fallbacks_total", &[]);
    zero_counter("calsync_changes_published_total", &[]);
    metrics::gauge!("calsync_worker_in_flight").increment(0.0);
    // Not ready until the database gate's first probe finds PostgreSQL migrated and answering: a
    // worker that starts during an outage must say so, or the readiness alert sees nothing.
    metrics::gauge!("calsync_worker_database_up").set(0.0);
    let _ = metrics::histogram!("calsync_worker_processing_seconds");
    let _ = metrics::histogram!("calsync_webhook_end_to_end_seconds");
}
