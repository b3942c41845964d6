//! Why processing did not finish, sorted by what happens next. Transient vs permanent is decided
//! here, by type, once.

use std::time::Duration;

use calsync_common::calendly::CalendlyError;
use calsync_common::crypto::CryptoError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProcessError {
    /// Worth another try later (Calendly 5xx/429, database or broker hiccups).
    #[error("{reason}")]
    Transient { reason: String, at_least: Option<Duration> },
    /// Can never succeed as it is: goes to `calsync.dead` with this reason.
    #[error("{0}")]
    Permanent(String),
    /// The user must reconnect; park the delivery as `awaiting_reauth`.
    #[error("{0}")]
    NeedsReauth(String),
    /// PostgreSQL cannot be reached: nothing is wrong with the delivery, so it goes back to the
    /// queue without counting as an attempt, and consumption pauses until the database is back.
    #[error("{0}")]
    DatabaseDown(String),
    /// Not now: the user's Calendly budget is spent until `until`. Waits in a delay queue without
    /// counting as an attempt (it is nobody's failure, and the wait is never shorter than the
    /// window's reset, so it cannot loop hot).
    #[error("{reason}")]
    Deferred { reason: String, until: Duration },
}

impl ProcessError {
    pub fn transient(reason: impl Into<String>) -> Self {
        Self::Transient { reason: reason.into(), at_least: None }
    }
}

/// SQLSTATE of a statement canceled by `statement_timeout` (or by an operator).
const QUERY_CANCELED: &str = "57014";

impl From<sqlx::Error> for ProcessError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            // Errors of reaching the server, not of the statement: the database is down (or the
            // network to it), not this delivery broken.
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => Self::DatabaseDown(format!("database unreachable: {error}")),
            // A server that is shutting down or restarting answers with these SQLSTATE classes —
            // except 57014 (query_canceled: a statement or lock timeout of ours), which is this
            // delivery's failure: taking it for an outage would requeue it forever and pause
            // consumption for everyone. (55P03, lock_not_available, falls through to transient.)
            sqlx::Error::Database(ref e)
                if e.code().is_some_and(|c| (c.starts_with("57") && c != QUERY_CANCELED) || c.starts_with("08")) =>
            {
                Self::DatabaseDown(format!("database unavailable: {error}"))
            }
            other => Self::transient(format!("database: {other}")),
        }
    }
}

impl From<CryptoError> for ProcessError {
    /// A token written with a key this process does not hold means a rotation rolled out half-way,
    /// not that the user must reconnect: retried through the delay queues until the operator fixes
    /// the configuration, never parked. (A token failing its integrity check is parked by
    /// `tokens`, which knows whose it is.)
    fn from(error: CryptoError) -> Self {
        Self::transient(format!(
            "stored token cannot be decrypted ({error}): configuration error, check TOKEN_ENCRYPTION_KEY and \
             TOKEN_ENCRYPTION_PREVIOUS_KEYS on this worker"
        ))
    }
}

impl From<CalendlyError> for ProcessError {
    fn from(error: CalendlyError) -> Self {
        match error {
            CalendlyError::RateLimited { reset } => {
                Self::Transient { reason: error.to_string(), at_least: Some(reset) }
            }
            CalendlyError::Transient(_) | CalendlyError::Unauthorized => Self::transient(error.to_string()),
            CalendlyError::InvalidGrant(_) | CalendlyError::InsufficientScope { .. } => {
                Self::NeedsReauth(error.to_string())
            }
            CalendlyError::Forbidden(_)
            | CalendlyError::NotFound
            | CalendlyError::Conflict
            | CalendlyError::ForeignOrigin(_)
            | CalendlyError::Unexpected(_) => Self::Permanent(error.to_string()),
        }
    }
}
