//! Making sure a Calendly user has a working subscription to our callback URL: the one rule the
//! connect flow and the subscription health check share.

use secrecy::SecretString;

use super::client::CalendlyClient;
use super::error::CalendlyError;
use super::types::EventKind;

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error(transparent)]
    Calendly(#[from] CalendlyError),
    #[error("Calendly reports a duplicate subscription it does not list")]
    Unlisted,
    #[error("Calendly still reports a duplicate subscription after the old one was deleted")]
    StillDuplicate,
}

/// The URI of an active subscription of `user` to `callback_url` for the events we turn into
/// meetings: a new one, or the active one Calendly already has (409). A disabled one in the way is
/// deleted and replaced: it never recovers on its own (Calendly gave up retrying).
pub async fn ensure(
    calendly: &CalendlyClient,
    callback_url: &str,
    organization: &str,
    user: &str,
    token: &SecretString,
) -> Result<String, SubscriptionError> {
    // Our subscription asks for exactly the events we turn into meetings.
    let events = EventKind::ALL.map(EventKind::as_str);
    let create = || calendly.create_subscription(callback_url, &events, organization, user, token);
    if let Some(created) = create().await? {
        return Ok(created.uri);
    }
    let ours: Vec<_> = calendly
        .list_subscriptions(organization, user, token)
        .await?
        .into_iter()
        .filter(|s| s.callback_url == callback_url)
        .collect();
    if let Some(active) = ours.iter().find(|s| s.state == "active") {
        return Ok(active.uri.clone());
    }
    let Some(disabled) = ours.first() else { return Err(SubscriptionError::Unlisted) };
    calendly.delete_subscription(&disabled.uri, token).await?;
    match create().await? {
        Some(created) => Ok(created.uri),
        None => Err(SubscriptionError::StillDuplicate),
    }
}
