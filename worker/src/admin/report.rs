//! `calsync-worker connections` and `resync`: what operators ask of the connections, without a
//! token ever reaching their terminal.

use std::fmt;

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use calsync_common::db::connections::{self, ConnectionStatus, SubscriptionState};
use calsync_common::queue::message::{self, SyncJob, SyncKind};
use calsync_common::queue::{Broker, PublishError};

/// One connection as `connections` prints it: never a token.
#[derive(sqlx::FromRow)]
pub struct ConnectionLine {
    pub user_id: Uuid,
    pub calendly_user_uri: Option<String>,
    pub status: ConnectionStatus,
    pub webhook_subscription_uri: Option<String>,
    pub subscription_state: Option<SubscriptionState>,
    pub subscription_failing_since: Option<OffsetDateTime>,
    pub last_synced_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
}

impl ConnectionLine {
    /// `none`, `unchecked`, the state, or `failing since <time>`.
    fn subscription(&self) -> String {
        match (&self.webhook_subscription_uri, self.subscription_state, self.subscription_failing_since) {
            (None, _, _) => "none".into(),
            (Some(_), None, _) => "unchecked".into(),
            (Some(_), Some(SubscriptionState::Failing), Some(since)) => format!("failing-since-{since}"),
            (Some(_), Some(state), _) => state.as_str().into(),
        }
    }
}

impl fmt::Display for ConnectionLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = serde_json::to_value(self.status).ok().and_then(|v| v.as_str().map(str::to_owned));
        write!(
            f,
            "{}  {}  {}  subscription={}  last_sync={}  last_error={}",
            self.user_id,
            self.calendly_user_uri.as_deref().unwrap_or("-"),
            status.as_deref().unwrap_or("?"),
            self.subscription(),
            self.last_synced_at.map_or("never".into(), |t| t.to_string()),
            self.last_error.as_deref().unwrap_or("-"),
        )
    }
}

pub async fn connections(pool: &PgPool) -> sqlx::Result<Vec<ConnectionLine>> {
    sqlx::query_as(
        "SELECT user_id, calendly_user_uri, status, webhook_subscription_uri, subscription_state, \
             subscription_failing_since, last_synced_at, last_error \
         FROM calendar_connections ORDER BY created_at",
    )
    .fetch_all(pool)
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("user {0} has no Calendly connection")]
    NotConnected(Uuid),
    #[error("user {0}'s connection is not active; the user must reconnect first")]
    NotActive(Uuid),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("queueing the resync: {0}")]
    Broker(#[from] PublishError),
}

/// Queues a full resync (the same job as a backfill) of `user_id`'s connection now.
pub async fn resync(pool: &PgPool, broker: &Broker, user_id: Uuid) -> Result<Uuid, ResyncError> {
    let connection = connections::find_by_user(pool, user_id).await?.ok_or(ResyncError::NotConnected(user_id))?;
    if connection.status != ConnectionStatus::Active {
        return Err(ResyncError::NotActive(user_id));
    }
    broker.publish(&message::sync_job(&SyncJob::new(connection.id, SyncKind::Resync))).await?;
    Ok(connection.id)
}
