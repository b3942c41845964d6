//! Whose delivery is this: the connection of the webhook's `created_by`, and what the inbox already
//! says of the delivery — looked up for many deliveries in one statement
//! ([`connections::resolve_all`]). This is the one database round trip every delivery makes before
//! its rows reach the [`crate::writer`] (a delivery that calls Calendly also takes from the
//! user's budget, [`crate::budget`]); on a CPU-bound drain a statement per delivery here cost
//! PostgreSQL more than its share (BENCHMARKS.md, "The worker past 2.5×").
//!
//! No delivery waits for company: a lookup starts as soon as a slot is free, with every request
//! queued by then. Alone, a delivery is looked up at once; under load, the deliveries arriving
//! while the lookups are in flight go together in the next one.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use calsync_common::calendly::webhook::CalendlyUserUri;
use calsync_common::db::connections::{self, Resolved};

use crate::error::ProcessError;

/// The most deliveries in one lookup.
const MAX_PER_LOOKUP: usize = 256;
/// Lookups in flight at once (each holds a pooled connection while it runs).
const CONCURRENT_LOOKUPS: usize = 2;

struct Request {
    created_by: CalendlyUserUri,
    message_id: String,
    reply: oneshot::Sender<Result<Option<Resolved>, ProcessError>>,
}

/// Hands lookups to the resolver's loop. Cheap to clone; the loop stops when every clone is gone.
#[derive(Clone)]
pub struct Resolver {
    requests: mpsc::Sender<Request>,
}

impl Resolver {
    pub fn start(pool: PgPool) -> Self {
        let (requests, receiver) = mpsc::channel(MAX_PER_LOOKUP * CONCURRENT_LOOKUPS);
        tokio::spawn(lookup_loop(pool, receiver));
        Self { requests }
    }

    /// The active connection of `created_by` (the only way to find a delivery's user; there is no
    /// fallback) and the inbox status of `message_id`.
    pub async fn resolve(
        &self,
        created_by: &CalendlyUserUri,
        message_id: &str,
    ) -> Result<Option<Resolved>, ProcessError> {
        let (reply, answer) = oneshot::channel();
        let request = Request { created_by: created_by.clone(), message_id: message_id.to_owned(), reply };
        self.requests.send(request).await.map_err(|_| ProcessError::transient("the resolver has stopped"))?;
        answer.await.map_err(|_| ProcessError::transient("the resolver stopped before answering"))?
    }
}

async fn lookup_loop(pool: PgPool, mut receiver: mpsc::Receiver<Request>) {
    let slots = Arc::new(Semaphore::new(CONCURRENT_LOOKUPS));
    while let Some(first) = receiver.recv().await {
        // What arrives while every slot is busy joins this lookup.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut requests = vec![first];
        while requests.len() < MAX_PER_LOOKUP
            && let Ok(request) = receiver.try_recv()
        {
            requests.push(request);
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            look_up(&pool, requests).await;
            drop(slot);
        });
    }
}

async fn look_up(pool: &PgPool, requests: Vec<Request>) {
    let wanted: Vec<(&CalendlyUserUri, &str)> =
        requests.iter().map(|r| (&r.created_by, r.message_id.as_str())).collect();
    match connections::resolve_all(pool, &wanted).await {
        Ok(answers) => {
            for (request, answer) in requests.into_iter().zip(answers) {
                let _ = request.reply.send(Ok(answer));
            }
        }
        Err(error) => {
            let error = ProcessError::from(error);
            for request in requests {
                let _ = request.reply.send(Err(error.clone()));
            }
        }
    }
}
