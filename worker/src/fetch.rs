//! Fetching the scheduled event a delivery is about, sharing one Calendly call among concurrent
//! deliveries for the same event and connection (a group event's invitees arrive in bursts).
//!
//! A follower only takes the leader's answer when it is at least as new as the event snapshot
//! embedded in the follower's own payload; otherwise it fetches for itself, so sharing can never
//! make a meeting older than the delivery that mentions it.

use std::sync::Arc;

use time::OffsetDateTime;
use uuid::Uuid;

use calsync_common::calendly::types::ScheduledEvent;
use calsync_common::db::connections::Connection;

use crate::calendly_call::CalendlyCalls;
use crate::error::ProcessError;
use crate::single_flight::{Flight, SingleFlight};

/// In-flight event fetches by (connection, event URI). Keyed by connection so one user's token
/// never answers for another's delivery.
type EventFetches = SingleFlight<(Uuid, String), ScheduledEvent>;

/// Fetches events as their connection's user: a cheap-to-clone handle.
#[derive(Clone)]
pub struct EventFetcher {
    calls: CalendlyCalls,
    /// Fetches in flight in this process, shared by concurrent deliveries about one event.
    fetches: Arc<EventFetches>,
}

impl EventFetcher {
    pub fn new(calls: CalendlyCalls) -> Self {
        Self { calls, fetches: Arc::default() }
    }

    /// The event at `uri`, fetched with `connection`'s token (or shared from a concurrent fetch
    /// that is at least as new as `not_older_than`).
    pub async fn get_event(
        &self,
        connection: &Connection,
        uri: &str,
        not_older_than: Option<OffsetDateTime>,
    ) -> Result<ScheduledEvent, ProcessError> {
        // The SSRF guard runs before any token is touched or any fetch is shared.
        self.calls.calendly().api_url(uri).map_err(ProcessError::from)?;
        let key = (connection.id, uri.to_owned());
        match self.fetches.run_or_join(key, || self.fetch(connection, uri)).await {
            Flight::Led(result) => result,
            Flight::Joined(Some(event)) if not_older_than.is_some_and(|floor| event.updated_at >= floor) => {
                metrics::counter!("calsync_worker_shared_fetches_total").increment(1);
                Ok(event)
            }
            Flight::Joined(_) => self.fetch(connection, uri).await,
        }
    }

    async fn fetch(&self, connection: &Connection, uri: &str) -> Result<ScheduledEvent, ProcessError> {
        let calendly = self.calls.calendly();
        self.calls.call(connection, |token| async move { calendly.get_event(uri, &token).await }).await
    }
}
