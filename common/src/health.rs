//! `/healthz`, `/readyz` and `/metrics`, served the same way by both services; only what readiness
//! requires differs.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use std::time::Duration;

use crate::crypto::KeyFailures;
use crate::db::Database;
use crate::queue::Broker;

#[derive(Clone)]
pub struct Probe {
    pub broker: Broker,
    pub database: Database,
    /// The worker cannot work without PostgreSQL; ingest only reports it, because webhook intake
    /// must keep working while the database is down.
    pub database_required: bool,
    /// A process that must read stored tokens is not ready while they fail to decrypt.
    pub token_keys: Option<KeyFailures>,
}

/// How long a decryption failure keeps a process unready after the last one.
const KEY_FAILURE_WINDOW: Duration = Duration::from_secs(300);

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
    let key_failure = probe.token_keys.as_ref().and_then(|keys| keys.recent(KEY_FAILURE_WINDOW));
    let ready = broker && (database || !probe.database_required) && key_failure.is_none();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |up: bool| if up { "up" } else { "down" };
    let mut body = serde_json::json!({ "ready": ready, "broker": word(broker), "database": word(database) });
    if let Some(node) = probe.broker.current_node() {
        body["broker_node"] = node.into();
    }
    if probe.token_keys.is_some() {
        body["token_keys"] = match key_failure {
            None => "ok".into(),
            Some(why) => format!("stored tokens do not decrypt: {why}").into(),
        };
    }
    (status, Json(body))
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render_metrics())
}
