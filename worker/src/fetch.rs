//! Fetching the scheduled event a delivery is about, sharing one Calendly call among concurrent
//! deliveries for the same event and connection (a group event's invitees arrive in bursts).
//!
//! A follower only takes the leader's answer when it is at least as new as the event snapshot
//! embedded in the follower's own payload; otherwise it fetches for itself, so sharing can never
//! make a meeting older than the delivery that mentions it.

use std::collections::HashMap;
use std::sync::Mutex;

use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use calsync_common::calendly::types::ScheduledEvent;
use calsync_common::db::connections::Connection;

use crate::deps::Deps;
use crate::error::ProcessError;
use crate::refresh;

type Slot = watch::Receiver<Option<Option<ScheduledEvent>>>;

#[derive(Default)]
pub struct SingleFlight {
    /// In-flight fetches by (connection, event URI). Keyed by connection so one user's token never
    /// answers for another's delivery.
    inflight: Mutex<HashMap<(Uuid, String), Slot>>,
}

impl SingleFlight {
    /// The event at `uri`, fetched with `connection`'s token (or shared from a concurrent fetch that
    /// is at least as new as `not_older_than`).
    pub async fn get_event(
        &self,
        deps: &Deps,
        connection: &Connection,
        uri: &str,
        not_older_than: Option<OffsetDateTime>,
    ) -> Result<ScheduledEvent, ProcessError> {
        // The SSRF guard runs before any token is touched or any fetch is shared.
        deps.calendly.api_url(uri).map_err(ProcessError::from)?;
        let key = (connection.id, uri.to_owned());
        let joined = {
            let mut inflight = self.inflight.lock().expect("single-flight lock");
            match inflight.get(&key) {
                Some(slot) => Err(slot.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key.clone(), rx);
                    Ok(tx)
                }
            }
        };
        match joined {
            Ok(leader) => {
                let result = fetch(deps, connection, uri).await;
                self.inflight.lock().expect("single-flight lock").remove(&key);
                let _ = leader.send(Some(result.as_ref().ok().cloned()));
                result
            }
            Err(mut follower) => {
                let shared = follower.wait_for(Option::is_some).await.ok().and_then(|v| v.clone().flatten());
                match (shared, not_older_than) {
                    (Some(event), Some(floor)) if event.updated_at >= floor => {
                        metrics::counter!("calsync_worker_shared_fetches_total").increment(1);
                        Ok(event)
                    }
                    _ => fetch(deps, connection, uri).await,
                }
            }
        }
    }
}

async fn fetch(deps: &Deps, connection: &Connection, uri: &str) -> Result<ScheduledEvent, ProcessError> {
    refresh::call(deps, connection, |token| async move { deps.calendly.get_event(uri, &token).await }).await
}
