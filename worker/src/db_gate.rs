//! Whether the worker should take deliveries at all: not while PostgreSQL is unreachable. Every
//! delivery would fail, and counting those failures as attempts would dead-letter healthy webhooks
//! during a long database outage. The consumers pause (cancel their consumer, keep the connection)
//! while the gate is closed and resume when it opens again.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use calsync_common::db::Database;

/// How often the database is probed (and so how soon consuming resumes after an outage).
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct DbGate {
    up: watch::Sender<bool>,
}

impl Default for DbGate {
    fn default() -> Self {
        Self { up: watch::channel(true).0 }
    }
}

impl DbGate {
    /// A delivery just failed to reach the database: close at once (the probe reopens it).
    pub fn report_down(&self) {
        if self.up.send_replace(false) {
            tracing::warn!("PostgreSQL is unreachable; pausing consumption until it is back");
            metrics::gauge!("calsync_worker_database_up").set(0.0);
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Probes the database until `shutdown`, opening and closing the gate as it comes and goes.
    pub async fn watch(self, database: Database, shutdown: CancellationToken) {
        // Probe first, then wait: the gauge is there from the worker's first scrape on.
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = probe.tick() => {}
            }
            let up = database.is_up().await;
            let was = self.up.send_replace(up);
            // Set on every probe, not only on a change: a worker that never lost its database
            // must still say it has it, or the readiness alert sees nothing at all.
            metrics::gauge!("calsync_worker_database_up").set(if up { 1.0 } else { 0.0 });
            if up != was {
                if up {
                    tracing::info!("PostgreSQL is back; resuming consumption");
                } else {
                    tracing::warn!("PostgreSQL is unreachable; pausing consumption until it is back");
                }
            }
        }
    }
}
