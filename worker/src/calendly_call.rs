//! One way to call Calendly as a user: inside that user's API budget, with that user's own token,
//! refreshed once after a 401, short rate limits waited out, transient failures retried for a few
//! seconds, and every other answer turned into a typed error.

use std::future::Future;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use calsync_common::calendly::rate;
use calsync_common::calendly::{CalendlyClient, CalendlyError};
use calsync_common::db::changes::ReauthReason;
use calsync_common::db::connections::Connection;
use calsync_common::retry;

use crate::budget::{Budget, Budgets};
use crate::error::ProcessError;
use crate::tokens::Tokens;

/// A 429 whose reset is at most this long is waited out in-process; longer ones go to the broker's
/// delayed-retry path so the worker slot is freed.
const MAX_IN_PROCESS_RATE_WAIT: Duration = Duration::from_secs(2);

/// What a call is for, which decides what a token lacking a scope means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Reading the user's events: without it calsync cannot do its job, so a missing scope makes
    /// the connection `needs_reauth` and parks its deliveries.
    Essential,
    /// A check around the job (the subscription's health): a missing scope is reported on the
    /// connection and the check skipped. Grants made before calsync asked for `webhooks:read` lack
    /// it; parking every such connection on the first check after a deploy would stop all of them.
    Auxiliary,
}

/// Calling Calendly as a user: a cheap-to-clone handle over the client, that user's tokens and
/// the API budgets.
#[derive(Clone)]
pub struct CalendlyCalls {
    calendly: CalendlyClient,
    /// The user's own token, refreshed once after a 401.
    tokens: Tokens,
    /// Each Calendly user's API budget, shared by the fleet.
    budgets: Budgets,
}

impl CalendlyCalls {
    pub fn new(calendly: CalendlyClient, tokens: Tokens, budgets: Budgets) -> Self {
        Self { calendly, tokens, budgets }
    }

    /// The client, for the call itself (inside [`Self::call`]'s closure).
    pub fn calendly(&self) -> &CalendlyClient {
        &self.calendly
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Runs `call` with `connection`'s token: refreshes once after a 401, waits out short rate
    /// limits, retries transient failures for a few seconds, and turns everything else into a
    /// typed error.
    pub async fn call<T, F, Fut>(&self, connection: &Connection, call: F) -> Result<T, ProcessError>
    where
        F: FnMut(SecretString) -> Fut,
        Fut: Future<Output = Result<T, CalendlyError>>,
    {
        call_for(Need::Essential, self, connection, call).await
    }

    /// [`Self::call`] for a check around the job: a token lacking a scope is a
    /// [`ProcessError::Permanent`] saying the user should reconnect to enable it, and never touches
    /// the connection's status.
    pub async fn call_auxiliary<T, F, Fut>(&self, connection: &Connection, call: F) -> Result<T, ProcessError>
    where
        F: FnMut(SecretString) -> Fut,
        Fut: Future<Output = Result<T, CalendlyError>>,
    {
        call_for(Need::Auxiliary, self, connection, call).await
    }
}

async fn call_for<T, F, Fut>(
    need: Need,
    calls: &CalendlyCalls,
    connection: &Connection,
    mut call: F,
) -> Result<T, ProcessError>
where
    F: FnMut(SecretString) -> Fut,
    Fut: Future<Output = Result<T, CalendlyError>>,
{
    let mut token = calls.tokens.access_token(connection).await?;
    let mut refreshed_after_401 = false;
    let mut backoff = retry::calendly_call();
    loop {
        let permit = match calls.budgets.reserve(Budget::Api, connection).await? {
            Ok(permit) => permit,
            Err(wait) if wait <= MAX_IN_PROCESS_RATE_WAIT && backoff.next_delay().is_some() => {
                tokio::time::sleep(wait).await;
                continue;
            }
            Err(wait) => {
                metrics::counter!("calsync_calendly_budget_deferrals_total").increment(1);
                let reason = format!("this Calendly user's API budget is spent; the window resets in {wait:?}");
                return Err(ProcessError::Deferred { reason, until: wait });
            }
        };
        let secret = SecretString::from(token.secret.expose_secret().to_owned());
        let (result, rate) = rate::observe(call(secret)).await;
        calls.budgets.settle(permit, rate).await;
        let error = match result {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        match error {
            CalendlyError::Unauthorized if !refreshed_after_401 => {
                refreshed_after_401 = true;
                token = calls.tokens.after_unauthorized(connection, &token).await?;
            }
            CalendlyError::RateLimited { reset } if reset <= MAX_IN_PROCESS_RATE_WAIT => match backoff.next_delay() {
                Some(_) => tokio::time::sleep(reset).await,
                None => return Err(CalendlyError::RateLimited { reset }.into()),
            },
            CalendlyError::Transient(_) => match backoff.next_delay() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(error.into()),
            },
            CalendlyError::InsufficientScope { .. } if need == Need::Auxiliary => {
                return Err(ProcessError::Permanent(format!(
                    "{error}; reconnect Calendly to enable subscription health (the connection keeps working)"
                )));
            }
            CalendlyError::InsufficientScope { .. } => {
                // Not someone else's resource: this grant can never read ours. The user must
                // reconnect (with the scopes); the connection says which ones are missing.
                let reason = format!("{error}; the user must reconnect Calendly to grant it");
                let code = ReauthReason::InsufficientScope;
                return Err(calls.tokens.park(connection, Some(&token.ciphertext), code, reason).await);
            }
            other => return Err(other.into()),
        }
    }
}
