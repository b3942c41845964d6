//! `calsync-worker connections`: one line per connection, never a token.

use std::fmt;

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use calsync_common::db::connections::{self, Connection, ConnectionStatus, SubscriptionState};

/// One connection as `connections` prints it: never a token.
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

impl From<Connection> for ConnectionLine {
    fn from(c: Connection) -> Self {
        Self {
            user_id: c.user_id,
            calendly_user_uri: c.calendly_user_uri,
            status: c.status,
            webhook_subscription_uri: c.webhook_subscription_uri,
            subscription_state: c.subscription_state,
            subscription_failing_since: c.subscription_failing_since,
            last_synced_at: c.last_synced_at,
            last_error: c.last_error,
        }
    }
}

/// Every connection, oldest first, through the same data layer the services use.
pub async fn connections(pool: &PgPool) -> sqlx::Result<Vec<ConnectionLine>> {
    Ok(connections::all(pool).await?.into_iter().map(ConnectionLine::from).collect())
}
