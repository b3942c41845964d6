//! `/healthz`, `/readyz` and `/metrics`, served the same way by both services; only what readiness
//! requires differs.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::db::Database;
use crate::queue::Broker;

#[derive(Clone)]
pub struct Probe {
    pub broker: Broker,
    pub database: Database,
    /// The worker cannot work without PostgreSQL; ingest only reports it, because webhook intake
    /// must keep working while the database is down.
    pub database_required: bool,
}

/// The three routes, for any router state (they carry their own).
pub fn router<S: Clone + Send + Sync + 'static>(probe: Probe) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probe)
}

/// `200` when ready, else `503`; the body always says how the broker and the database are.
async fn readyz(State(probe): State<Probe>) -> impl IntoResponse {
    let broker = probe.broker.is_ready();
    let database = probe.database.is_up().await;
    let ready = broker && (database || !probe.database_required);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |up: bool| if up { "up" } else { "down" };
    (status, Json(serde_json::json!({ "ready": ready, "broker": word(broker), "database": word(database) })))
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render_metrics())
}
