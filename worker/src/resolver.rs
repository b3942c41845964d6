//! Whose delivery is this: the connection of the webhook's `created_by`, and what the inbox already
//! says of the delivery — looked up for many deliveries in one statement
//! ([`connections::resolve_all`], gathered by [`crate::batched`]). With the budget's take (also
//! gathered, [`crate::budget`]) these are the round trips a delivery makes before its rows reach
//! the [`crate::writer`]; on a CPU-bound drain a statement per delivery here cost PostgreSQL more
//! than its share (BENCHMARKS.md, "The worker past 2.5×").

use sqlx::PgPool;

use calsync_common::calendly::webhook::CalendlyUserUri;
use calsync_common::db::connections::{self, Resolved};

use crate::batched::{Batched, Gathering};
use crate::error::ProcessError;

const GATHERING: Gathering = Gathering { most: 256, in_flight: 2 };

/// Hands lookups to the gathering loop. Cheap to clone; the loop stops when every clone is gone.
#[derive(Clone)]
pub struct Resolver {
    lookups: Batched<(CalendlyUserUri, String), Option<Resolved>>,
}

impl Resolver {
    pub fn start(pool: PgPool) -> Self {
        let lookups = Batched::start(GATHERING, move |wanted: Vec<(CalendlyUserUri, String)>| {
            let pool = pool.clone();
            async move {
                let wanted: Vec<(&CalendlyUserUri, &str)> = wanted.iter().map(|(uri, id)| (uri, id.as_str())).collect();
                Ok(connections::resolve_all(&pool, &wanted).await?)
            }
        });
        Self { lookups }
    }

    /// The active connection of `created_by` (the only way to find a delivery's user; there is no
    /// fallback) and the inbox status of `message_id`.
    pub async fn resolve(
        &self,
        created_by: &CalendlyUserUri,
        message_id: &str,
    ) -> Result<Option<Resolved>, ProcessError> {
        self.lookups.ask((created_by.clone(), message_id.to_owned())).await
    }
}
