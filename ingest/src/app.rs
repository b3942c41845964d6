//! Shared state and the router.

use std::sync::Arc;

use axum::Router;

use crate::connect::ConnectService;
use calsync_common::calendly::signature::WebhookVerifier;
use calsync_common::db::Database;
use calsync_common::health;
use calsync_common::queue::Broker;

use crate::routes;
use crate::settings::IngestSettings;

/// Everything handlers need. Read-only after start-up and internally synchronised (the broker and
/// pool manage their own connections), so one `Arc` shared by all requests is enough; it derefs to
/// [`Shared`], so handlers write `state.broker`.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
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
    // Ready = the broker can take webhooks; the database is reported but webhook intake does not need it.
    let probe = health::Probe {
        broker: state.broker.clone(),
        database: state.database.clone(),
        database_required: false,
        token_keys: None,
    };
    let body_deadline = state.settings.request_timeout();
    // Probes and scrapes carry no body.
    let no_body = routes::body::BodyLimits { max_bytes: 0, deadline: body_deadline };
    Router::new()
        .merge(routes::webhooks::router(state.settings.ingest_max_in_flight, body_deadline))
        .merge(routes::connect::router(state.clone(), body_deadline))
        .merge(
            health::router(probe).route_layer(axum::middleware::from_fn_with_state(no_body, routes::body::read_whole)),
        )
        .with_state(state)
}
