//! Shared state: everything handlers need, built once at start.

use std::sync::Arc;

use calsync_common::calendly::signature::WebhookVerifier;
use calsync_common::db::Database;
use calsync_common::queue::Broker;

use crate::connect::ConnectService;
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
