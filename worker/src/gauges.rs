//! Gauges every worker keeps current from the tables (not from what it did itself), so whichever
//! worker is scraped tells the truth about the whole fleet:
//! - `calsync_connections{status}`: Calendly connections by status (`needs_reauth` is alerted on);
//! - `calsync_subscriptions{state}`: active connections by what their last subscription check found;
//! - `calsync_changes_unpublished`: committed changes the push side has not published yet.

use std::time::Duration;

use sqlx::PgPool;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use calsync_common::db::changes;
use calsync_common::db::connections::{self, ConnectionStatus, SubscriptionState};

/// How often the gauges are read from the tables.
const INTERVAL: Duration = Duration::from_secs(5);

pub async fn keep_current(pool: PgPool, subscriptions: bool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(counts) = connections::count_by_status(&pool).await {
            for status in ConnectionStatus::ALL {
                let n = counts.iter().find(|(s, _)| *s == status).map_or(0, |(_, n)| *n);
                metrics::gauge!("calsync_connections", "status" => status.as_str()).set(n as f64);
            }
        }
        if subscriptions && let Ok(counts) = connections::count_by_subscription_state(&pool).await {
            for state in SubscriptionState::ALL {
                let n = counts.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
                metrics::gauge!("calsync_subscriptions", "state" => state.as_str()).set(n as f64);
            }
        }
        if let Ok(mut conn) = pool.acquire().await
            && let Ok(backlog) = changes::unpublished(&mut conn).await
        {
            metrics::gauge!("calsync_changes_unpublished").set(backlog as f64);
        }
    }
}
