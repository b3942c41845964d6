//! What can go wrong talking to Calendly, sorted by what the caller should do about it.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CalendlyError {
    /// 401: the access token is invalid or expired (refresh once, then give up).
    #[error("Calendly rejected the access token (401)")]
    Unauthorized,
    /// 403: the token's user may not see this resource (never retried; never "fixed" by another token).
    #[error("Calendly refused access (403): {0}")]
    Forbidden(String),
    /// 403 "Insufficient scope": the grant lacks a scope calsync needs; only a reconnect (a new
    /// consent with the scopes) fixes it.
    #[error("the Calendly grant lacks the scope(s) {}", .required.join(", "))]
    InsufficientScope { required: Vec<String> },
    #[error("Calendly has no such resource (404)")]
    NotFound,
    /// 409: it exists already (a subscription to the same URL).
    #[error("Calendly reports that this already exists (409)")]
    Conflict,
    /// 429: wait at least `reset` (Calendly's `X-RateLimit-Reset`, in seconds).
    #[error("Calendly rate limit reached; resets in {reset:?}")]
    RateLimited { reset: Duration },
    /// 5xx, timeouts, connection errors: worth retrying.
    #[error("Calendly is temporarily unavailable: {0}")]
    Transient(String),
    /// The refresh token is no longer valid: the user must reconnect.
    #[error("Calendly refused the grant (invalid_grant): {0}")]
    InvalidGrant(String),
    /// A URI that is not on the configured API origin: never sent a token.
    #[error("refusing to call {0}: not on the Calendly API origin")]
    ForeignOrigin(String),
    /// Anything else (4xx we do not expect, unparseable answers).
    #[error("unexpected Calendly answer: {0}")]
    Unexpected(String),
}

impl CalendlyError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_) | Self::RateLimited { .. })
    }
}
