//! `/healthz`, `/readyz` (broker and database) and `/metrics` on `WORKER_ADDR`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use calsync_common::db::Database;
use calsync_common::queue::Broker;

#[derive(Clone)]
pub struct HealthState {
    pub broker: Broker,
    pub database: Database,
}

pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Ready = able to do work: both the broker and the database are needed.
async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    let broker = state.broker.is_ready();
    let database = state.database.is_up().await;
    let status = if broker && database { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |up: bool| if up { "up" } else { "down" };
    (
        status,
        Json(serde_json::json!({ "ready": broker && database, "broker": word(broker), "database": word(database) })),
    )
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], calsync_common::telemetry::render_metrics())
}
