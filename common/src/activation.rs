//! What follows a connection becoming `active` under an identity Calendly confirmed, whichever way
//! it got there: the app confirming an OAuth consent (ingest's connect flow) or the import of an
//! existing integration's rows (`calsync-worker import-connections`). One place, so both make the
//! same subscription, queue the same backfill and record the same problems.
//!
//! Replaying the account's parked deliveries is the last step of both, and is [`crate::replay`]:
//! each caller decides when (ingest after answering the app, the import before its next row).

use secrecy::SecretString;
use sqlx::PgPool;
use url::Url;

use crate::calendly::subscription::{self, SubscriptionError};
use crate::calendly::{CalendlyClient, CalendlyError};
use crate::db::connections::{self, Connection};
use crate::queue::Broker;
use crate::queue::message::{SyncJob, SyncKind, sync_job};

/// What the steps use.
pub struct Activation<'a> {
    pub pool: &'a PgPool,
    pub calendly: &'a CalendlyClient,
    /// Where the backfill job goes.
    pub broker: &'a Broker,
    /// Where our webhook subscription delivers; `None` = create none.
    pub callback_url: Option<&'a Url>,
}

impl Activation<'_> {
    /// Makes sure `connection` (just stored, `active`, `access` its working token) has our
    /// subscription (created, reused, or replacing the one it had) and queues its backfill.
    /// What could not be done is recorded in the connection's `last_error` and returned; the
    /// connection stays active either way (the periodic checks retry the subscription).
    pub async fn subscribe_and_backfill(
        &self,
        connection: &Connection,
        access: &SecretString,
    ) -> sqlx::Result<Option<String>> {
        let mut problems = Vec::new();
        let mut subscription = connection.webhook_subscription_uri.clone();
        if let Some(callback_url) = self.callback_url {
            match self.ensure_subscription(callback_url, connection, access).await {
                Ok(uri) => {
                    // A reconnect that had to replace our old subscription (disabled, say): the old
                    // one must not linger at Calendly.
                    if let Some(old) = subscription.as_deref().filter(|old| *old != uri)
                        && let Err(error) = self.calendly.delete_subscription(old, access).await
                    {
                        tracing::warn!(connection_id = %connection.id, %error, "could not delete the replaced subscription");
                    }
                    subscription = Some(uri);
                }
                Err(problem) => problems.push(problem),
            }
        }
        if let Err(error) = self.broker.publish(&sync_job(&SyncJob::new(connection.id, SyncKind::Backfill))).await {
            problems.push(format!("backfill not queued: {error}"));
        }
        let last_error = (!problems.is_empty()).then(|| problems.join("; "));
        connections::set_subscription(self.pool, connection.id, subscription.as_deref(), last_error.as_deref()).await?;
        Ok(last_error)
    }

    /// Creates our user-scoped subscription (or reuses / replaces the one Calendly has). Errors are
    /// returned as the text recorded in `last_error`.
    async fn ensure_subscription(
        &self,
        callback_url: &Url,
        connection: &Connection,
        token: &SecretString,
    ) -> Result<String, String> {
        let (Some(organization), Some(user)) = (&connection.calendly_organization_uri, &connection.calendly_user_uri)
        else {
            return Err("webhook subscription not created: the connection has no Calendly user or organization".into());
        };
        subscription::ensure(self.calendly, callback_url.as_str(), organization, user, token).await.map_err(|error| {
            match error {
                SubscriptionError::Calendly(CalendlyError::Forbidden(_)) => {
                    "webhook subscriptions need a paid Calendly plan (403): connected, but no webhooks will arrive"
                        .to_owned()
                }
                other => format!("webhook subscription not created: {other}"),
            }
        })
    }
}
