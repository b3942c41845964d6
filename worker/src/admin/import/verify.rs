//! Asking Calendly whose grant an imported row holds: `GET /users/me` with the row's access token,
//! and once, if that token is expired or refused, with a refreshed one. Inside each Calendly user's
//! API and token budgets (shared with the running fleet), short waits and outages ridden out.
//!
//! Nothing here writes our database except the budgets' bookkeeping; the verdict says what to store.

use std::future::Future;

use secrecy::SecretString;
use time::OffsetDateTime;

use calsync_common::calendly::types::CalendlyUser;
use calsync_common::calendly::{CalendlyClient, CalendlyError, rate};
use calsync_common::db::changes::ReauthReason;
use calsync_common::retry;

use super::source::SourceRow;
use crate::budget::{Budget, Budgets};
use crate::error::ProcessError;

/// A working grant and who it belongs to, according to Calendly.
pub struct Verified {
    pub me: CalendlyUser,
    pub access: SecretString,
    pub refresh: SecretString,
    pub expires_at: OffsetDateTime,
    /// The source's refresh token was spent getting it (the source's tokens are dead now).
    pub refreshed: bool,
}

pub enum Verdict {
    Verified(Verified),
    /// The row's grant cannot be made to work: its user must reconnect.
    Unverifiable {
        code: ReauthReason,
        reason: String,
    },
    /// Calendly (or our database) could not answer now; nothing was spent, a rerun tries again.
    Failed(String),
}

/// Why a budgeted call did not return a value.
enum CallError {
    Calendly(CalendlyError),
    Database(ProcessError),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Calendly(error) => error.fmt(f),
            Self::Database(error) => write!(f, "the budget could not be read: {error}"),
        }
    }
}

#[derive(Clone)]
pub struct Verifier {
    pub calendly: CalendlyClient,
    pub budgets: Budgets,
}

impl Verifier {
    /// Who `row`'s grant belongs to, refreshing it once if Calendly refuses its access token.
    pub async fn verify(&self, row: &SourceRow) -> Verdict {
        // Calendly counts requests per Calendly user; until Calendly has said who that is, the
        // stored URI (or, without one, the app user) names the budget.
        let account = row.calendly_user_uri.clone().unwrap_or_else(|| format!("import:{}", row.user_id));
        if let Some(access) = &row.access_token {
            match self.users_me(&account, access).await {
                Ok(me) => {
                    let Some(refresh) = row.refresh_token.clone() else {
                        // It works for two hours at most, and then nothing can renew it.
                        return unverifiable(ReauthReason::Unverified, "the row has no refresh token");
                    };
                    // The source does not say when it expires (Calendly's last two hours): stored as
                    // due, so the first worker to use it refreshes it (inside the user's token
                    // budget) and its expiry is known from then on. The import itself uses it now,
                    // while Calendly has just accepted it.
                    let expires_at = OffsetDateTime::now_utc();
                    return Verdict::Verified(Verified {
                        me,
                        access: access.clone(),
                        refresh,
                        expires_at,
                        refreshed: false,
                    });
                }
                Err(CallError::Calendly(CalendlyError::Unauthorized)) => {}
                Err(error) => return self.verdict_on(error),
            }
        }
        let Some(refresh) = &row.refresh_token else {
            let reason = if row.access_token.is_some() {
                "Calendly refused the access token (401) and the row has no refresh token"
            } else {
                "the row has no token"
            };
            return unverifiable(ReauthReason::Unverified, reason);
        };
        let tokens = match self.budgeted(Budget::Token, &account, || self.calendly.refresh(refresh)).await {
            Ok(tokens) => tokens,
            Err(CallError::Calendly(CalendlyError::InvalidGrant(detail))) => {
                return unverifiable(
                    ReauthReason::InvalidGrant,
                    &format!("Calendly refused the refresh token (invalid_grant): {detail}"),
                );
            }
            Err(CallError::Calendly(CalendlyError::Unauthorized)) => {
                return Verdict::Failed(
                    "Calendly refused calsync's OAuth client at the token endpoint (401): calsync must run with \
                     the Calendly OAuth app (CALENDLY_OAUTH_CLIENT_ID / SECRET) that issued these tokens"
                        .into(),
                );
            }
            Err(error) => return Verdict::Failed(format!("refreshing the token: {error}")),
        };
        let expires_at = tokens.expires_at(OffsetDateTime::now_utc());
        match self.users_me(&account, &tokens.access_token).await {
            Ok(me) => Verdict::Verified(Verified {
                me,
                access: tokens.access_token,
                refresh: tokens.refresh_token,
                expires_at,
                refreshed: true,
            }),
            Err(error) => {
                // The source's refresh token is spent: this pair is the only one left, and nobody can
                // be told whose it is. It is given back to Calendly; the user reconnects.
                self.revoke_quietly(&tokens.access_token, &tokens.refresh_token).await;
                let code = match &error {
                    CallError::Calendly(CalendlyError::InsufficientScope { .. }) => ReauthReason::InsufficientScope,
                    _ => ReauthReason::Unverified,
                };
                unverifiable(code, &format!("refreshed, but Calendly would not say whose grant it is: {error}"))
            }
        }
    }

    /// The verdict on a `/users/me` that failed for another reason than a 401.
    fn verdict_on(&self, error: CallError) -> Verdict {
        match error {
            CallError::Calendly(error @ CalendlyError::InsufficientScope { .. }) => {
                unverifiable(ReauthReason::InsufficientScope, &format!("{error}; the user must reconnect to grant it"))
            }
            other => Verdict::Failed(format!("asking Calendly whose grant this is: {other}")),
        }
    }

    async fn users_me(&self, account: &str, token: &SecretString) -> Result<CalendlyUser, CallError> {
        self.budgeted(Budget::Api, account, || self.calendly.users_me(token)).await
    }

    /// Revokes a pair the import will not keep (the new pair of a refresh it cannot use).
    pub async fn revoke_quietly(&self, access: &SecretString, refresh: &SecretString) {
        for token in [refresh, access] {
            if let Err(error) = self.calendly.revoke(token).await {
                tracing::warn!(%error, "could not revoke a token at Calendly");
            }
        }
    }

    /// Runs `call` inside `account`'s `budget`: waits while the budget is spent or Calendly says
    /// 429, retries transient failures for about a minute (an operator command holds no queue).
    async fn budgeted<T, F, Fut>(&self, budget: Budget, account: &str, mut call: F) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CalendlyError>>,
    {
        let mut delays = retry::operator_call();
        loop {
            let permit = match self.budgets.reserve_for(budget, account).await.map_err(CallError::Database)? {
                Ok(permit) => permit,
                Err(wait) => {
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let (result, rate) = rate::observe(call()).await;
            self.budgets.settle(permit, rate).await;
            let error = match result {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            // A 429 says how long to wait; an outage gets growing waits. Both give up after about
            // a minute of trying.
            let wait = match (&error, delays.next_delay()) {
                (CalendlyError::RateLimited { reset }, Some(_)) => *reset,
                (CalendlyError::Transient(_), Some(delay)) => delay,
                _ => return Err(CallError::Calendly(error)),
            };
            tokio::time::sleep(wait).await;
        }
    }
}

fn unverifiable(code: ReauthReason, reason: &str) -> Verdict {
    Verdict::Unverifiable { code, reason: reason.to_owned() }
}
