//! Each Calendly user's budgets, shared by every worker process through PostgreSQL
//! (`api_budgets`): the API window (50 requests a minute on the free plan, 500 on paid ones, as
//! the rate-limit headers of Calendly's answers say) and the token endpoint's (8 requests a
//! minute). A request is made only while the user's window has one left; otherwise the caller
//! learns how long until it resets and puts the work off (through the delay queues, never holding a
//! worker slot), so a burst for one user ends in a handful of 429s at most however many workers
//! drain it, and other users are never slowed by it.
//!
//! Cost: a take before each call, gathered with the takes of other calls in flight into one round
//! trip ([`crate::batched`]), and a statement after it when the answer says something the row does
//! not (measured in BENCHMARKS.md).

use std::time::Duration;

use sqlx::PgPool;

use calsync_common::calendly::rate::RateLimit;
use calsync_common::db::budgets::{self, Taken, Window};
use calsync_common::db::connections::Connection;

use crate::batched::{Batched, Gathering};
use crate::error::ProcessError;

/// Assumed until an answer says otherwise: Calendly's windows are a minute long.
const WINDOW: Duration = Duration::from_secs(60);
/// Assumed until an answer says otherwise: the smallest plan's limit, so a free user's first
/// window is never overshot by what the fleet sends before any answer is back.
const ASSUMED_API_LIMIT: u32 = 50;
/// Calendly's token endpoint: 8 requests per user a minute. Its answers carry no window, so this
/// budget is counted only.
const TOKEN_LIMIT: u32 = 8;

/// Which of a user's budgets a request draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// The API (events, invitees, subscriptions, users/me).
    Api,
    /// The token endpoint (refreshes).
    Token,
}

/// Whose budget a request draws on: Calendly counts requests per Calendly user.
pub fn account_of(connection: &Connection) -> String {
    // Several connections of one account share it; a connection without one yet is its own.
    connection.calendly_user_uri.clone().unwrap_or_else(|| connection.id.to_string())
}

impl Budget {
    /// The `api_budgets` row of `account` (see [`account_of`]).
    fn key(self, account: &str) -> String {
        match self {
            Self::Api => format!("api:{account}"),
            Self::Token => format!("token:{account}"),
        }
    }

    fn window(self) -> Window {
        match self {
            Self::Api => Window { limit: ASSUMED_API_LIMIT, length: WINDOW, known: false },
            Self::Token => Window { limit: TOKEN_LIMIT, length: WINDOW, known: true },
        }
    }
}

/// Takes gathered into one round trip at most, and round trips in flight at once.
const GATHERING: Gathering = Gathering { most: 256, in_flight: 2 };

/// The fleet's budgets: a cheap-to-clone handle over the pool that holds them.
#[derive(Clone)]
pub struct Budgets {
    pool: PgPool,
    takes: Batched<(String, Window), Taken>,
}

/// Leave to make one request as a user, counted already; [`Permit::settle`] tells the budget what
/// the answer said.
#[must_use = "settle the permit with the answer's rate-limit headers"]
pub struct Permit {
    key: String,
    window: i64,
    seen: budgets::Seen,
    taken_at: std::time::Instant,
}

impl Budgets {
    /// Starts the loop that gathers takes (inside a Tokio runtime).
    pub fn new(pool: PgPool) -> Self {
        let takes = Batched::start(GATHERING, {
            let pool = pool.clone();
            move |wanted: Vec<(String, Window)>| {
                let pool = pool.clone();
                async move {
                    let wanted: Vec<(&str, Window)> =
                        wanted.iter().map(|(key, window)| (key.as_str(), *window)).collect();
                    Ok(budgets::take_all(&pool, &wanted).await?)
                }
            }
        });
        Self { pool, takes }
    }

    /// Leave to call Calendly now as `connection`'s Calendly user, or how long until that user's
    /// window of `budget` resets.
    pub async fn reserve(
        &self,
        budget: Budget,
        connection: &Connection,
    ) -> Result<Result<Permit, Duration>, ProcessError> {
        self.reserve_for(budget, &account_of(connection)).await
    }

    /// [`Self::reserve`] for a Calendly account that has no connection row (yet): the import of
    /// an existing integration's rows, keyed by the account the row names.
    pub async fn reserve_for(&self, budget: Budget, account: &str) -> Result<Result<Permit, Duration>, ProcessError> {
        let key = budget.key(account);
        Ok(match self.takes.ask((key.clone(), budget.window())).await? {
            Taken::Granted { window, seen } => Ok(Permit { key, window, seen, taken_at: std::time::Instant::now() }),
            Taken::Spent { wait } => Err(wait.max(Duration::from_millis(100))),
        })
    }

    /// Records what the answer said about the window (nothing when it carried no headers, or
    /// nothing the row does not already say). The call has been made by then: a database that
    /// cannot take the correction costs the budget its precision for this answer (the next one
    /// corrects it), never the call's result.
    pub async fn settle(&self, permit: Permit, rate: Option<RateLimit>) {
        let Some(rate) = rate else { return };
        if !permit.seen.needs(permit.taken_at.elapsed(), rate) {
            return;
        }
        if let Err(error) = budgets::settle(&self.pool, &permit.key, permit.window, rate).await {
            tracing::warn!(%error, budget = %permit.key, "the answer's rate limit was not recorded");
        }
    }
}
