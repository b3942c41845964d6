//! `calsync-worker resync <user_id>`: queue a full resync of one user's connection now.

use sqlx::PgPool;
use uuid::Uuid;

use calsync_common::db::connections::{self, ConnectionStatus};
use calsync_common::queue::message::{self, SyncJob, SyncKind};
use calsync_common::queue::{Broker, PublishError};

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
