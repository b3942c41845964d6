//! `calsync-worker connections`, `resync`, `dead` and `forget`: what operators ask of the data,
//! without tokens or bodies ever reaching their terminal.

use std::fmt;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use calsync_common::db::connections::{self, ConnectionStatus, SubscriptionState};
use calsync_common::queue::message::{self, DEATH_REASON_HEADER, Incoming, SyncJob, SyncKind};
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

/// One dead letter as `dead` prints it: never its body.
pub struct DeadLine {
    pub age: time::Duration,
    pub event: String,
    pub attempts: u32,
    pub reason: String,
}

impl fmt::Display for DeadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let age = self.age.whole_seconds().max(0);
        write!(
            f,
            "age={}h{:02}m  {}  attempts={}  {}",
            age / 3600,
            age % 3600 / 60,
            self.event,
            self.attempts,
            self.reason
        )
    }
}

/// Lists `calsync.dead` without consuming it: every message is read unacknowledged and goes back to
/// the queue when the channel closes.
pub async fn dead(broker: &Broker) -> Result<Vec<DeadLine>, PublishError> {
    let channel = broker.open_channel().await?;
    let queue = broker.topology().dead_queue();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let waiting = channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .map_err(PublishError::Channel)?
        .message_count();
    let mut lines = Vec::new();
    for _ in 0..waiting {
        let got = channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await;
        let Some(got) = got.map_err(PublishError::Channel)? else { break };
        let incoming = Incoming::read(&got.delivery);
        let event = serde_json::from_slice::<serde_json::Value>(&incoming.body)
            .ok()
            .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| {
                if got.delivery.routing_key.as_str().ends_with("sync") { "sync job" } else { "?" }.into()
            });
        lines.push(DeadLine {
            age: OffsetDateTime::now_utc() - incoming.received_at,
            event,
            // The dead letter's own attempt count (the header counts failed attempts).
            attempts: incoming.attempt.saturating_sub(1),
            reason: message::str_header(&got.delivery.properties, DEATH_REASON_HEADER).unwrap_or_default(),
        });
    }
    // Closing without acks puts every one back.
    let _ = channel.close(200, "listed".into()).await;
    Ok(lines)
}

/// What `forget` erased.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub invitees: u64,
    pub meetings: u64,
    pub inbox_bodies: u64,
}

/// Erases an invitee's personal data wherever we hold it (a data deletion request: Calendly's own
/// deletion never reaches our copy): name and email on their invitee rows, locations that mention
/// them, and the kept bodies of parked deliveries that mention them (those can then not be replayed).
pub async fn forget(pool: &PgPool, email: &str) -> sqlx::Result<Forgotten> {
    let mut tx = pool.begin().await?;
    let invitees = sqlx::query(
        "UPDATE meeting_invitees SET email = NULL, name = NULL, updated_at = now() WHERE lower(email) = lower($1)",
    )
    .bind(email)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let meetings = sqlx::query(
        "UPDATE meetings SET location = NULL, updated_at = now() \
         WHERE location IS NOT NULL AND strpos(lower(location::text), lower($1)) > 0",
    )
    .bind(email)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let inbox_bodies = sqlx::query(
        "UPDATE webhook_inbox SET body = NULL \
         WHERE body IS NOT NULL AND strpos(lower(convert_from(body, 'UTF8')), lower($1)) > 0",
    )
    .bind(email)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(Forgotten { invitees, meetings, inbox_bodies })
}
