//! Shared state and the router.

use std::sync::Arc;

use axum::Router;

use crate::connect::ConnectService;
use calsync_common::calendly::signature::WebhookVerifier;
use calsync_common::db::Database;
use calsync_common::queue::Broker;

use crate::routes;
use crate::settings::IngestSettings;

/// Everything handlers need. Read-only after start-up and internally synchronised (the broker and
/// pool manage their own connections), so one `Arc` shared by all requests is enough.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Shared>,
}

pub struct Shared {
    pub settings: IngestSettings,
    pub verifier: WebhookVerifier,
    pub broker: Broker,
    /// The connection API needs it (readiness only reports it); webhook intake must keep working
    /// while it is down.
    pub database: Database,
    /// The OAuth connect flow and connection API (needs PostgreSQL).
    pub connect: ConnectService,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(routes::webhooks::router())
        .merge(routes::connect::router())
        .merge(routes::health::router())
        .with_state(state)
}
