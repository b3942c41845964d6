//! calendly-sim: a stateful stand-in for Calendly, for tests, the demo, compose and benchmarks.
//!
//! - [`model`]: the simulated world and the JSON shapes Calendly answers with.
//! - [`sim`]: shared state and every operation (book, cancel, reschedule, no-show, faults, ...).
//! - [`api`]: Calendly API v2 behind bearer auth, per-user rate limits and injected faults.
//! - [`oauth`]: authorize / token / revoke, with PKCE and single-use rotating refresh tokens.
//! - [`webhook`]: the events, a captured delivery, and Calendly's signature scheme.
//! - [`delivery`]: signed webhook delivery with Calendly-like retries, or capture for tests.
//! - [`control`]: the `/_sim` control API.
//! - [`load`]: the load generator behind `calendly-sim load`.

// Handlers short-circuit with a ready `Response` as their error; boxing it would only add noise in a
// test double whose error path is not hot.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod control;
pub mod delivery;
pub mod load;
pub mod model;
pub mod oauth;
pub mod sim;
pub mod webhook;

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;

pub use model::Plan;
pub use sim::{
    Booking, Cancellation, FailNext, Faults, NewInvitee, NewUser, Sim, SimConfig, SubscriptionChange, TokenFaults,
};
pub use webhook::{Captured, DeliveryMode};

pub fn router(sim: Sim) -> Router {
    Router::new().merge(api::router()).merge(oauth::router()).merge(control::router()).with_state(sim)
}

/// A running simulator.
pub struct SimServer {
    pub addr: SocketAddr,
    pub sim: Sim,
    task: tokio::task::JoinHandle<()>,
}

impl SimServer {
    /// Binds `addr` (use `127.0.0.1:0` in tests) and serves until dropped.
    pub async fn start(config: SimConfig, addr: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let sim = Sim::new(config, format!("http://{addr}"));
        let app = router(sim.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, sim, task })
    }

    /// Base URL: both the API base and the auth base (Calendly splits them; one server is enough).
    pub fn url(&self) -> String {
        self.sim.uris().api.clone()
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
