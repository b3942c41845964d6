//! calsync-ingest: the HTTP face of calsync.
//!
//! - [`state`]: the shared state handlers read.
//! - [`app`]: the router.
//! - [`error`]: the one API error type; each variant names its status code.
//! - [`settings`]: ingest's settings (its own, plus the groups shared with the worker).
//! - [`routes`]: webhook intake and the connection API (thin: extract, call, map).
//! - [`connect`]: the OAuth connect flow, status and disconnect, HTTP-free; replay of parked
//!   deliveries when an account connects.
//! - health, readiness and metrics come from `calsync_common::health`.
//!
//! [`Application::build`] binds the listener (port 0 in tests) and starts the broker and
//! database supervisors; [`Application::run_until_stopped`] serves until the shutdown token fires,
//! finishes in-flight requests, then closes the broker connection.

pub mod app;
pub mod connect;
pub mod error;
pub mod routes;
pub mod series;
pub mod serve;
pub mod settings;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connect::{ConnectOptions, ConnectService};
use calsync_common::calendly::CalendlyClient;
use calsync_common::calendly::signature::WebhookVerifier;
use calsync_common::crypto::TokenCipher;
use calsync_common::db::Database;
use calsync_common::queue::{Broker, BrokerConfig};

use settings::IngestSettings;
pub use state::AppState;

pub struct Application {
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: IngestSettings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        settings.validate()?;
        let cipher = TokenCipher::from_settings(&settings.shared.token_keys)?;
        // Installed before the first request so no count is lost before the first scrape.
        calsync_common::telemetry::metrics_handle();
        series::register();
        let listener = calsync_common::http::listen(&settings.ingest_addr, "INGEST_ADDR").await?;
        let broker = Broker::start(BrokerConfig {
            publish_channels: settings.ingest_publish_channels,
            confirm_timeout: settings.publish_timeout(),
            ..BrokerConfig::from_args(&settings.shared.amqp, "calsync-ingest")
        });
        let database = Database::start(&settings.shared.database.database_url, 10, shutdown.clone())?;
        let verifier = WebhookVerifier::new(
            settings.calendly_webhook_signing_keys.clone(),
            std::time::Duration::from_secs(settings.calendly_webhook_tolerance_secs),
        );
        let connect = ConnectService {
            pool: database.pool().clone(),
            cipher: Arc::new(cipher),
            calendly: CalendlyClient::new(&settings.shared.calendly)?,
            broker: broker.clone(),
            options: ConnectOptions {
                redirect_uri: settings.calendly_oauth_redirect_uri.clone(),
                callback_url: settings.callback_url().cloned(),
                replay_days: settings.inbox.inbox_replay_days,
            },
        };
        let state = AppState::new(state::Shared { settings, verifier, broker, database, connect });
        Ok(Self { listener, state, shutdown })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let addr = self.local_addr();
        tracing::info!(%addr, "calsync-ingest listening");
        let router = app::router(self.state.clone());
        tokio::spawn(sweep_pending_connects(self.state.clone(), self.shutdown.clone()));
        let shutdown = self.shutdown.clone();
        // Graceful: stop accepting on shutdown, let in-flight requests (and their publisher
        // confirms) finish, and only then close the broker connection.
        // An HTTP/1.1 connection carries one request at a time; beyond the in-flight limit plus room
        // for idle keep-alive connections, new connections are refused at once (memory stays bounded).
        let limits = serve::Limits {
            header_timeout: self.state.settings.request_timeout(),
            max_connections: self.state.settings.ingest_max_in_flight + 64,
            // A body's deadline, a publish confirm, and one Calendly call of the connection API.
            shutdown_grace: self.state.settings.request_timeout()
                + self.state.settings.publish_timeout()
                + SHUTDOWN_CALENDLY_ALLOWANCE,
            max_body_bytes: routes::webhooks::MAX_BODY_BYTES,
        };
        serve::serve(self.listener, router, limits, shutdown).await;
        self.state.broker.close().await;
        tracing::info!("calsync-ingest stopped");
        Ok(())
    }
}

/// What a graceful shutdown allows a connection API request still talking to Calendly.
const SHUTDOWN_CALENDLY_ALLOWANCE: std::time::Duration = std::time::Duration::from_secs(5);

/// How often expired pending connects are discarded and their tokens revoked.
const PENDING_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Consents nobody confirmed within ten minutes hold live tokens: revoke them.
async fn sweep_pending_connects(state: AppState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PENDING_SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if state.database.is_migrated()
            && let Err(error) = state.connect.sweep_expired().await
        {
            tracing::warn!(%error, "could not sweep expired pending connections");
        }
    }
}
