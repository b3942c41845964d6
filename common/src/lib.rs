//! What both of calsync's services share, and nothing only one of them uses (that lives beside its
//! user: the connect flow in ingest, operator work in the worker, each service's settings).
//!
//! - [`config`]: the settings groups both services read (environment or `--flags`, by clap).
//! - [`telemetry`]: tracing subscriber (pretty or JSON) and the Prometheus recorder.
//! - [`shutdown`]: SIGTERM / Ctrl-C turned into one [`tokio_util::sync::CancellationToken`].
//! - [`retry`]: the one place retry and reconnect policies live.
//! - [`crypto`]: AES-256-GCM token encryption with associated data and key rotation.
//! - [`calendly`]: Calendly wire formats, the typed webhook, the signature check, the API client.
//! - [`meeting`]: meeting and invitee rows built from Calendly's types (status and cancellation rules).
//! - [`queue`]: RabbitMQ topology, the confirming publisher, and every message shape (the only
//!   place that knows header names and routing keys).
//! - [`db`]: PostgreSQL pool, migrations, and the data access used by both services.
//! - [`activation`]: subscription and backfill of a connection just made active (connect, import).
//! - [`replay`]: republishing parked deliveries of a connected Calendly account.
//! - [`health`]: `/healthz`, `/readyz`, `/metrics` for both services.
//! - [`http`]: outgoing HTTP clients (rustls + ring) and the services' listeners.

pub mod activation;
pub mod calendly;
pub mod config;
pub mod crypto;
pub mod db;
pub mod health;
pub mod http;
pub mod meeting;
pub mod queue;
pub mod replay;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod traces;
