//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics))
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready = the broker can take webhooks. The database is reported but does not fail readiness:
/// webhook intake does not need it.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let broker = state.inner.broker.is_ready();
    let database = state.inner.database.is_up().await;
    let status = if broker { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |up: bool| if up { "up" } else { "down" };
    (status, Json(serde_json::json!({ "ready": broker, "broker": word(broker), "database": word(database) })))
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], calsync_common::telemetry::render_metrics())
}
